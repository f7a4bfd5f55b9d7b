"""Fixtures shared by the e2e modules that read one small labelled OUTPUT."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.store.output import decode_mask
from tests.outputs import SmallRun, demo_like_run, small_run


@pytest.fixture(scope="session")
def run(request, tmp_path_factory, ray_session) -> SmallRun:
    """tests.outputs.small_run: labelled once per session on the session's Ray."""
    return small_run(request.config, tmp_path_factory)


@pytest.fixture(scope="session")
def masks(run) -> dict[str, np.ndarray]:
    """The small run's masks by image id (ok rows)."""
    return {r["image_id"]: decode_mask(r["mask"]) for r in run.table.to_pylist() if r["status"] == "ok"}


@pytest.fixture(scope="session")
def demo_output(request, tmp_path_factory, ray_session):
    """tests.outputs.demo_like_run: OUTPUT as `drn-label demo` leaves it (synthetic classes)."""
    return demo_like_run(request.config, tmp_path_factory)
