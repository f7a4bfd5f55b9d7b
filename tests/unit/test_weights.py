"""Checkpoints from s3://, gs:// and hf:// load as the same weights as the local file:
against moto's S3, the GCS emulator and a loopback stand-in for the Hub (HF_ENDPOINT)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import drn
from pipeline.store.weights import WeightsError, local_weights, parse_hub_uri
from tests.hubserver import HubServer
from tests.modelkit import authors_checkpoint

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return authors_checkpoint(tmp_path_factory.mktemp("ckpt") / "drn_d_22_seg.pth", num_classes=5)


def sha_of(weights: str) -> str:
    return drn.create_model("drn_d_22", weights=weights).drn_config.weights_sha256


def test_s3_and_gs_weights_are_cached_and_equal(checkpoint, s3_server, gcs_server, tmp_path,
                                                monkeypatch):
    monkeypatch.setenv("DRN_LABEL_CACHE", str(tmp_path / "cache"))
    bucket = s3_server.make_bucket("weights")
    s3_uri = s3_server.put(bucket, "models/drn_d_22_seg.pth", checkpoint.read_bytes())
    gcs_server.make_bucket("gweights")
    gs_uri = gcs_server.upload_tree(checkpoint.parent, "gweights", "models") + "/" + checkpoint.name
    expected = sha_of(str(checkpoint))
    for uri in (s3_uri, gs_uri):
        local = local_weights(uri)
        assert Path(local).read_bytes() == checkpoint.read_bytes()
        assert str(tmp_path / "cache") in local and local_weights(uri) == local  # cached
        assert sha_of(local) == expected
    with pytest.raises(WeightsError, match=r"weights s3://weights/none.pth: no such object"):
        local_weights("s3://weights/none.pth")


def test_local_paths_and_urls_pass_through(checkpoint):
    assert local_weights(str(checkpoint)) == str(checkpoint)
    assert local_weights("http://dl.yf.io/drn/x.pth") == "http://dl.yf.io/drn/x.pth"
    assert local_weights(None) is None
    assert parse_hub_uri("hf://acme/drn@v1/sub/w.pth") == ("acme/drn", "v1", "sub/w.pth")
    with pytest.raises(WeightsError, match="expected hf://OWNER/REPO/FILE"):
        local_weights("hf://acme/only")


def test_hf_weights_through_hf_endpoint(checkpoint, tmp_path):
    """In a fresh interpreter: huggingface_hub reads HF_ENDPOINT when it is imported."""
    with HubServer() as hub:
        hub.add("acme/drn-seg", "ckpt/drn_d_22_seg.pth", checkpoint.read_bytes())
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"),
               "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(REPO)}
        env.pop("HF_TOKEN", None)
        code = ("import json, drn; from pipeline.store.weights import local_weights, WeightsError\n"
                "p = local_weights('hf://acme/drn-seg/ckpt/drn_d_22_seg.pth')\n"
                "sha = drn.create_model('drn_d_22', weights=p).drn_config.weights_sha256\n"
                "try:\n    local_weights('hf://acme/drn-seg/missing.pth'); err = None\n"
                "except WeightsError as e:\n    err = str(e)\n"
                "print(json.dumps({'path': p, 'sha': sha, 'err': err}))\n")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr
        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert any(r.startswith("GET /acme/drn-seg/resolve/main/ckpt/drn_d_22_seg.pth")
                   for r in hub.requests)
    assert got["path"].startswith(str(tmp_path / "hf"))
    assert got["sha"] == sha_of(str(checkpoint))
    assert got["err"].startswith("weights hf://acme/drn-seg/missing.pth: cannot be downloaded")
