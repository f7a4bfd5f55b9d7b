"""Checkpoints in every layout the loader promises, written here the way their authors
write them, and the errors a user meets when a file does not fit."""
from __future__ import annotations

import datetime
import functools
import hashlib
import http.server
import logging
import os
import re
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.hub

import drn
from drn.checkpoints import RELEASED_WEIGHTS, guess_architecture
from drn.io import atomic_write


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(1, 3, 37, 53, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def seg22(image):
    """A 19-class drn_d_22 DRNSeg with non-trivial BatchNorm statistics, and its output."""
    model = drn.create_model("drn_d_22", num_classes=19, seed=7)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)
            elif name.endswith("running_var"):
                buffer.copy_(torch.rand(buffer.shape, generator=generator) + 0.5)
        return model, model(image)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _authors_drnseg_file(model, path: Path) -> Path:
    """As the authors' released Cityscapes models: a bare DRNSeg state dict."""
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, path)
    return path


# --- the authors' layouts -----------------------------------------------------------------

def test_authors_drnseg_loads_strictly_and_reproduces(seg22, image, tmp_path):
    model, expected = seg22
    path = _authors_drnseg_file(model, tmp_path / "drn_d_22_cityscapes.pth")
    checkpoint = drn.load_checkpoint(path)
    assert (checkpoint.layout, checkpoint.meta, checkpoint.task, checkpoint.num_classes) == (
        "authors-drnseg", None, "segment", 19)
    loaded = drn.create_model("drn_d_22", weights=path, classes="cityscapes")
    with torch.no_grad():
        assert torch.equal(loaded(image), expected)
    config = loaded.drn_config
    assert (config.num_classes, config.weights_sha256, config.weights_source) == (19, _sha256(path), str(path))
    assert config.label_set == drn.get_preset("cityscapes")
    assert not loaded.up.weight.requires_grad


def test_authors_training_checkpoint_strips_module_prefix(seg22, image, tmp_path):
    model, expected = seg22
    path = tmp_path / "checkpoint_latest.pth.tar"
    torch.save({
        "epoch": 12,
        "arch": "drn_d_22",
        "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
        "best_prec1": torch.tensor(71.5),
    }, path)
    checkpoint = drn.load_checkpoint(path)
    assert checkpoint.layout == "authors-drnseg"
    assert checkpoint.meta == {"epoch": 12, "arch": "drn_d_22", "best_prec1": 71.5,
                               "wrapper": "training", "stripped_prefix": "module."}
    assert not any(k.startswith("module.") for k in checkpoint.state_dict)
    with torch.no_grad():
        assert torch.equal(drn.create_model("drn_d_22", weights=path)(image), expected)


def test_old_file_without_num_batches_tracked(seg22, image, tmp_path):
    model, expected = seg22
    path = tmp_path / "old.pth"
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, path)
    checkpoint = drn.load_checkpoint(path)
    assert len(checkpoint.state_dict) == len(model.state_dict())
    with torch.no_grad():
        assert torch.equal(drn.create_model("drn_d_22", weights=path)(image), expected)


@pytest.mark.parametrize(("name", "layout"), [
    ("drn_d_22", "authors-drn"), ("drn_c_26", "authors-drn"), ("drn_a_18", "torchvision-resnet"),
])
def test_classifier_loads_for_classify_and_as_segmentation_backbone(name, layout, image, tmp_path, caplog):
    classifier = drn.create_model(name, task="classify", seed=5)
    path = tmp_path / f"{name}-imagenet.pth"
    torch.save(classifier.state_dict(), path)
    assert drn.load_checkpoint(path).layout == layout

    loaded = drn.create_model(name, task="classify", weights=path)  # 1000 classes from fc
    with torch.no_grad():
        assert torch.equal(loaded(image), classifier(image))
    assert loaded.drn_config.weights_sha256 == _sha256(path)

    with caplog.at_level(logging.WARNING, logger="drn.checkpoints"):
        seg = drn.create_model(name, weights=path, num_classes=5)
    assert f"{name}: loaded only the backbone from {path} (a classifier checkpoint)" in caplog.text
    with torch.no_grad():
        assert torch.equal(seg.base(torch.zeros(1, 3, 16, 16)), classifier.forward_features(torch.zeros(1, 3, 16, 16)))
    fresh = drn.create_model(name, num_classes=5)
    assert torch.equal(seg.seg.weight, fresh.seg.weight)  # the head keeps its seeded init
    assert seg.drn_config.weights_sha256.startswith("init:")
    assert seg.drn_config.weights_sha256 != fresh.drn_config.weights_sha256


def test_project_format_carries_metadata(seg22, image, tmp_path):
    model = drn.create_model("drn_d_22", classes="cityscapes", seed=7)
    path = drn.save_checkpoint(model, tmp_path / "own.pth")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert {k: raw[k] for k in ("format", "arch", "task", "num_classes")} == {
        "format": "drn-label/1", "arch": "drn_d_22", "task": "segment", "num_classes": 19}
    assert raw["label_set"] == drn.get_preset("cityscapes").to_dict()
    checkpoint = drn.load_checkpoint(path)
    assert checkpoint.layout == "drn-label/1" and checkpoint.arch == "drn_d_22"
    loaded = drn.create_model("drn_d_22", weights=path)
    assert loaded.drn_config.label_set == drn.get_preset("cityscapes")
    with torch.no_grad():
        assert torch.equal(loaded(image), model(image))


def test_checkpoint_object_is_not_shared_with_models(seg22, tmp_path):
    model, _ = seg22
    checkpoint = drn.load_checkpoint(_authors_drnseg_file(model, tmp_path / "seg.pth"))
    a = drn.create_model("drn_d_22", weights=checkpoint)
    with torch.no_grad():
        a.seg.bias.add_(1.0)
    assert torch.equal(checkpoint.state_dict["seg.bias"], model.seg.bias)


# --- sources ------------------------------------------------------------------------------

def test_file_url(seg22, tmp_path):
    model, _ = seg22
    path = _authors_drnseg_file(model, tmp_path / "my model.pth")
    checkpoint = drn.load_checkpoint(path.as_uri())
    assert checkpoint.source == path.as_uri() and checkpoint.sha256 == _sha256(path)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def http_root(tmp_path):
    """A directory served on 127.0.0.1 (loopback only) by a thread."""
    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_download_is_verified_and_cached(seg22, image, http_root, tmp_path):
    model, expected = seg22
    root, base = http_root
    staged = _authors_drnseg_file(model, tmp_path / "staged.pth")
    digest = _sha256(staged)
    name = f"drn_d_22-{digest[:8]}.pth"
    (root / name).write_bytes(staged.read_bytes())
    cache = tmp_path / "cache"

    checkpoint = drn.load_checkpoint(f"{base}/{name}", cache_dir=cache)
    assert checkpoint.sha256 == digest and checkpoint.source == f"{base}/{name}"
    assert [p.name for p in (cache / "checkpoints").iterdir()] == [name]  # no temporary file left
    (root / name).unlink()  # the second load must come from the cache
    again = drn.load_checkpoint(f"{base}/{name}", cache_dir=cache)
    assert again.sha256 == digest
    with torch.no_grad():
        assert torch.equal(drn.create_model("drn_d_22", weights=again)(image), expected)


def test_http_download_uses_env_cache(seg22, http_root, tmp_path, monkeypatch):
    model, _ = seg22
    root, base = http_root
    _authors_drnseg_file(model, root / "plain.pth")
    monkeypatch.setenv("DRN_LABEL_CACHE", str(tmp_path / "env-cache"))
    drn.load_checkpoint(f"{base}/plain.pth")
    assert len(list((tmp_path / "env-cache" / "checkpoints").glob("*/plain.pth"))) == 1


def test_corrupt_download_fails_with_expected_and_got(seg22, http_root, tmp_path):
    model, _ = seg22
    root, base = http_root
    staged = _authors_drnseg_file(model, tmp_path / "staged.pth")
    prefix = _sha256(staged)[:8]
    corrupt = bytearray(staged.read_bytes())
    corrupt[len(corrupt) // 2] ^= 0xFF
    name = f"drn_d_22-{prefix}.pth"
    (root / name).write_bytes(bytes(corrupt))
    got = hashlib.sha256(bytes(corrupt)).hexdigest()
    cache = tmp_path / "cache"
    url = f"{base}/{name}"
    with pytest.raises(drn.CheckpointError) as info:
        drn.load_checkpoint(url, cache_dir=cache)
    assert str(info.value) == (
        f"{url}: sha256 mismatch: expected {prefix}... (from the file name) but got {got}; "
        "the download is corrupt or the file changed: retry, or check the URL"
    )
    assert list((cache / "checkpoints").iterdir()) == []  # nothing half-written is kept


def test_download_failure_names_the_url(http_root, tmp_path):
    _, base = http_root
    with pytest.raises(drn.CheckpointError, match=rf"^{base}/missing.pth: download failed \(HTTP Error 404"):
        drn.load_checkpoint(f"{base}/missing.pth", cache_dir=tmp_path)
    assert [p for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()] == []  # nothing half-written


class _Terminal:
    """A stand-in stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("terminal", [False, True])
def test_download_uses_torch_hub_with_progress_only_on_a_terminal(seg22, http_root, tmp_path, monkeypatch, terminal):
    root, base = http_root
    _authors_drnseg_file(seg22[0], root / "plain.pth")
    calls = []
    real = torch.hub.download_url_to_file

    def spy(url, dst, hash_prefix=None, progress=True):
        calls.append((url, Path(dst).parent, hash_prefix, progress))
        real(url, dst, hash_prefix=hash_prefix, progress=False)

    monkeypatch.setattr(torch.hub, "download_url_to_file", spy)
    if terminal:
        monkeypatch.setattr(sys, "stderr", _Terminal())
    drn.load_checkpoint(f"{base}/plain.pth", cache_dir=tmp_path)
    assert len(calls) == 1
    url, folder, hash_prefix, progress = calls[0]
    assert (url, folder.parent, hash_prefix, progress) == (f"{base}/plain.pth", tmp_path / "checkpoints", None, terminal)
    assert [p.name for p in folder.iterdir()] == ["plain.pth"]


# --- atomic local writes --------------------------------------------------------------------

def test_atomic_write_replaces_the_file_whole(tmp_path):
    target = tmp_path / "table.bin"
    target.write_bytes(b"old")
    with atomic_write(target) as f:
        f.write(b"new ")
        assert target.read_bytes() == b"old"  # readers still see the old file
        (part,) = [p for p in tmp_path.iterdir() if p != target]
        assert re.fullmatch(r"\.table\.bin\.[0-9a-f]{32}\.part", part.name)
        f.write(b"bytes")
    assert target.read_bytes() == b"new bytes"
    assert list(tmp_path.iterdir()) == [target]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask

    with atomic_write(tmp_path / "notes.txt", "w", encoding="utf-8") as f:
        f.write("caf\u00e9\n")
    assert (tmp_path / "notes.txt").read_bytes() == "caf\u00e9\n".encode()
    with pytest.raises(ValueError, match="mode must be 'wb' or 'w', got 'ab'"):
        with atomic_write(tmp_path / "x", "ab"):
            pass


def test_atomic_write_failure_leaves_no_temporary_file_and_no_target(tmp_path):
    target = tmp_path / "model.pth"
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_write(target) as f:
            f.write(b"half a checkpoint")
            raise RuntimeError("disk on fire")
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"good")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target) as f:
            f.write(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == [target] and target.read_bytes() == b"good"


def test_save_checkpoint_writes_atomically(tmp_path, monkeypatch):
    model = drn.create_model("drn_d_22", num_classes=2)
    path = drn.save_checkpoint(model, tmp_path / "deep" / "own.pth")
    assert [p.name for p in path.parent.iterdir()] == ["own.pth"]
    assert drn.load_checkpoint(path).meta["label_set"] == drn.LabelSet.default(2).to_dict()

    def fail(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError, match="No space left"):
        drn.save_checkpoint(model, tmp_path / "deep" / "other.pth")
    assert [p.name for p in path.parent.iterdir()] == ["own.pth"]


def test_released_weights_table():
    assert RELEASED_WEIGHTS["drn_d_22:imagenet"].url == "http://dl.yf.io/drn/drn_d_22-4bd2f8ea.pth"
    assert RELEASED_WEIGHTS["drn_c_26:imagenet"].url == "http://dl.yf.io/drn/drn_c_26-ddedf421.pth"
    assert RELEASED_WEIGHTS["drn_d_105:imagenet"].url == "http://dl.yf.io/drn/drn_d_105-12b40979.pth"
    city = RELEASED_WEIGHTS["drn_d_22:cityscapes"]
    assert (city.url, city.task, city.preset) == (
        "http://dl.yf.io/drn/drn_d_22_cityscapes.pth", "segment", "cityscapes")
    for release in RELEASED_WEIGHTS.values():
        assert release.arch in drn.list_models()


# --- errors -------------------------------------------------------------------------------

def test_num_classes_conflict_names_both_numbers(seg22, tmp_path):
    model, _ = seg22
    path = _authors_drnseg_file(model, tmp_path / "city.pth")
    with pytest.raises(drn.CheckpointError) as info:
        drn.create_model("drn_d_22", num_classes=7, weights=path)
    assert str(info.value) == (
        f"{path}: num_classes conflict: expected 7 (given as num_classes) but got 19 "
        "from the checkpoint's seg.weight; leave num_classes out to use 19"
    )
    labels = tmp_path / "seven.txt"
    labels.write_text("".join(f"c{i}\n" for i in range(7)))
    with pytest.raises(drn.CheckpointError) as info:
        drn.create_model("drn_d_22", classes=labels, weights=path)
    assert str(info.value) == (
        f"{path}: num_classes conflict: expected 7 (label set 'seven') but got 19 from the "
        "checkpoint's seg.weight; pass a label set with 19 classes"
    )


def test_wrong_architecture_lists_keys_and_guesses(tmp_path):
    other = drn.create_model("drn_d_38", num_classes=19)
    path = _authors_drnseg_file(other, tmp_path / "mystery.pth")
    with pytest.raises(drn.CheckpointError) as info:
        drn.create_model("drn_d_22", weights=path)
    assert str(info.value) == (
        f"{path}: the weights do not fit drn_d_22 (task 'segment'): 96 unexpected keys "
        "(base.3.2.conv1.weight, base.3.2.bn1.weight, base.3.2.bn1.bias, base.3.2.bn1.running_mean, "
        "base.3.2.bn1.running_var, ...); the file looks like drn_d_38: use create_model('drn_d_38', ...)"
    )


def test_wrong_family_lists_missing_and_unexpected(tmp_path):
    path = tmp_path / "c26.pth"
    torch.save(drn.create_model("drn_c_26", task="classify").state_dict(), path)
    with pytest.raises(drn.CheckpointError) as info:
        drn.create_model("drn_d_22", task="classify", weights=path)
    message = str(info.value)
    assert message.startswith(
        f"{path}: the weights do not fit drn_d_22 (task 'classify'): 30 missing keys (layer0.0.weight, "
        "layer0.1.weight, layer0.1.bias, layer0.1.running_mean, layer0.1.running_var, ...); "
    )
    assert "; 60 unexpected keys (conv1.weight, bn1.weight, bn1.bias, bn1.running_mean, bn1.running_var, ...)" in message
    assert message.endswith("; the file looks like drn_c_26: use create_model('drn_c_26', ...)")


def test_unknown_layout_matches_no_architecture(tmp_path):
    path = tmp_path / "junk.pth"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(drn.CheckpointError, match="; the file matches no registered architecture$"):
        drn.create_model("drn_d_22", num_classes=2, weights=path)
    assert drn.load_checkpoint(path).layout == "unknown"


def test_segmentation_file_for_classify_task(seg22, tmp_path):
    path = _authors_drnseg_file(seg22[0], tmp_path / "seg.pth")
    with pytest.raises(drn.CheckpointError) as info:
        drn.create_model("drn_d_22", task="classify", weights=path)
    assert str(info.value) == (
        f"{path}: holds a segmentation model (keys base.*, seg.*, up.weight), not a classifier; "
        "create drn_d_22 with task='segment'"
    )


def test_metadata_architecture_mismatch(tmp_path):
    path = drn.save_checkpoint(drn.create_model("drn_d_22", num_classes=2), tmp_path / "own.pth")
    with pytest.raises(drn.CheckpointError) as info:
        drn.create_model("drn_d_38", weights=path)
    assert str(info.value) == (
        f"{path}: the checkpoint holds drn_d_22 (its metadata says so) but drn_d_38 was asked "
        "for; use create_model('drn_d_22', ...)"
    )


def test_unreadable_files(tmp_path):
    with pytest.raises(drn.CheckpointError, match=r"nope.pth: no such file; pass a path, a file:// or http"):
        drn.load_checkpoint(tmp_path / "nope.pth")
    unsafe = tmp_path / "pickle.pth"
    torch.save({"when": datetime.date(2024, 1, 1)}, unsafe)
    with pytest.raises(drn.CheckpointError, match=r"cannot be read with torch.load\(weights_only=True\)"):
        drn.load_checkpoint(unsafe)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(drn.CheckpointError, match="garbage.pth: cannot be read"):
        drn.load_checkpoint(garbage)
    with pytest.raises(ValueError, match="needs a model built by drn.create_model"):
        drn.save_checkpoint(torch.nn.Linear(2, 2), tmp_path / "x.pth")


def test_guess_architecture_in_both_layouts():
    for name in ["drn_a_18", "drn_c_26", "drn_d_22", "drn_d_24"]:
        classify = drn.create_model(name, task="classify", num_classes=3).state_dict()
        segment = drn.create_model(name, num_classes=3).state_dict()
        assert guess_architecture(classify) == [name]
        assert guess_architecture(segment) == [name]
