"""`drn-label push` against a real Label Studio server on loopback (tests/labelstudio.py):
predictions attach to existing tasks matched by image URL, the rest become new tasks, and
what the server's own API returns decodes to the Parquet masks."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline import decode_mask
from pipeline.cli import cli
from pipeline.store.reader import read_metadata
from pipeline.tools.export import label_studio_config
from tests.e2e.test_export import brush_region
from tests.labelstudio import LabelStudio, label_studio  # noqa: F401 - fixture


def tasks_of(api, url: str, project: int) -> list[dict]:
    body = api.get(f"{url}/api/tasks", params={"project": project, "page_size": 1000,
                                               "fields": "all"}, timeout=60).json()
    return body["tasks"] if isinstance(body, dict) else body


def test_push_attaches_to_existing_tasks_and_creates_the_rest(run, label_studio: LabelStudio,
                                                              cli_runner):
    api = label_studio.api()
    url = label_studio.url
    meta = read_metadata(str(run.output))[0]
    rows = {r["uri"]: r for r in run.table.to_pylist() if r["status"] == "ok"}
    project = api.post(f"{url}/api/projects", json={
        "title": "drn-label push", "label_config": label_studio_config(meta)}, timeout=60).json()["id"]
    existing = sorted(rows)[:2]
    api.post(f"{url}/api/projects/{project}/import", timeout=120, json=[
        {"data": {"image": uri}} for uri in existing] + [{"data": {"image": "http://elsewhere/x.png"}}])
    before = {t["data"]["image"]: t["id"] for t in tasks_of(api, url, project)}

    env = {"LABEL_STUDIO_API_KEY": label_studio.token}
    res = cli_runner.invoke(cli, ["push", str(run.output), "--url", url, "--project", str(project)],
                            env=env)
    assert res.exit_code == 0, res.output
    assert res.output.strip() == (f"pushed 10 predictions to Label Studio project {project}: "
                                  "2 on existing tasks, 8 new tasks (2 error rows skipped)")
    assert label_studio.token not in res.output

    tasks = {t["data"]["image"]: t for t in tasks_of(api, url, project)}
    assert set(tasks) == set(rows) | {"http://elsewhere/x.png"}
    for uri in existing:
        assert tasks[uri]["id"] == before[uri]  # attached, not duplicated
    for uri, row in rows.items():
        predictions = api.get(f"{url}/api/predictions", params={"task": tasks[uri]["id"]},
                              timeout=60).json()
        assert len(predictions) == 1, uri
        (prediction,) = predictions
        assert prediction["model_version"] == f"{meta.model}@{meta.weights_sha256[:12]}"
        mask = decode_mask(row["mask"])
        rebuilt = np.full(mask.shape, 255, np.uint8)
        for result in prediction["result"]:
            region = brush_region(result)
            rebuilt[region] = meta.classes.index(result["value"]["brushlabels"][0])
        np.testing.assert_array_equal(rebuilt, mask, err_msg=uri)
    assert not api.get(f"{url}/api/predictions", timeout=60,
                       params={"task": tasks["http://elsewhere/x.png"]["id"]}).json()

    again = cli_runner.invoke(cli, ["push", str(run.output), "--url", url, "--project",
                                    str(project)], env=env)
    assert again.exit_code == 0, again.output
    assert "0 on existing tasks, 0 new tasks, 10 already there" in again.output


def test_push_with_a_bad_token_names_the_fix(run, label_studio: LabelStudio, cli_runner):
    res = cli_runner.invoke(cli, ["push", str(run.output), "--url", label_studio.url,
                                  "--project", "1"], env={"LABEL_STUDIO_API_KEY": "not-a-token"})
    assert res.exit_code == 1
    assert "was refused (HTTP 401); check the token" in res.output
