"""drn-label's pipeline: the Ray Data job, its output format, and the CLI.

The modules that need no Ray (``output``, ``decode``, ``sources``, ``spec``) import
without it; Ray is imported only where a job is built or run.
"""
from __future__ import annotations

from pipeline.output import decode_mask, read_masks  # noqa: F401
