"""Hostile inputs and shared storage, on the session's real local Ray.

Every input, however hostile, becomes exactly one row or a clear error within bounded
time and memory; OUTPUT's files that drn-label did not write are never read, rewritten
or deleted; credentials never reach Ray's logs or the run's records.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
import zlib
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cli import cli
from pipeline.store.output import SCHEMA, data_files
from tests.imagegen import scene

FLAGS = ["--num-classes", "3", "--batch-size", "4", "--max-side", "64"]


def write_png(path: Path, seed: int = 0, size: tuple[int, int] = (24, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), scene(*size, seed)[..., ::-1])
    return path


def label(cli_runner, input_: Path | str, output: Path, *extra: str):
    result = cli_runner.invoke(cli, ["run", str(input_), str(output), *FLAGS, *extra])
    return result


def rows_of(output: Path) -> dict[str, dict]:
    table = pq.read_table(data_files(str(output)), schema=SCHEMA,
                          columns=["image_id", "status", "error", "uri"])
    ids = table["image_id"].to_pylist()
    assert len(ids) == len(set(ids)), Counter(ids).most_common(3)
    return {r["image_id"]: r for r in table.to_pylist()}


# -- OUTPUT ownership ----------------------------------------------------------------------------
def test_nested_outputs_and_foreign_files_are_left_alone(ray_session, cli_runner, tmp_path):
    images = tmp_path / "imgs"
    for k in range(4):
        write_png(images / f"{k}.png", k)
    out = tmp_path / "out_nest"
    assert label(cli_runner, images, out / "v1").exit_code == 0
    # A user's own files inside OUTPUT: a Parquet file without a model column, one whose
    # model column is null, a folder named _tmp, a garbage .parquet.
    pq.write_table(pa.table({"x": [1, 2]}), out / "mine.parquet")
    pq.write_table(pa.table({"image_id": ["0.png"], "model": pa.nulls(1, pa.string())}),
                   out / "other.parquet")
    (out / "_tmp").mkdir()
    (out / "_tmp" / "notes.txt").write_text("keep me")
    (out / "garbage.parquet").write_bytes(b"not parquet at all")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    res = label(cli_runner, images, out)
    assert res.exit_code == 0, res.output
    assert "4 ok, 0 errors, 0 already labelled (of 4 inputs)" in res.output  # v1's rows are not its own
    assert "holds 4 Parquet file(s) drn-label did not write there" in res.output
    res = label(cli_runner, images, out, "--overwrite")
    assert res.exit_code == 0, res.output
    assert "--overwrite: removed 4 rows" in res.output
    for path, data in before.items():  # nothing of v1 or of the user was touched
        assert path.read_bytes() == data, path
    assert sorted(rows_of(out)) == ["0.png", "1.png", "2.png", "3.png"]
    assert sorted(rows_of(out / "v1")) == ["0.png", "1.png", "2.png", "3.png"]

    res = cli_runner.invoke(cli, ["inspect", str(out)])
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    assert "4 rows, 4 ok, 0 errors" in res.output
    assert "not labels (Parquet files drn-label did not write here, left alone)" in res.output
    res = cli_runner.invoke(cli, ["export", str(out), "--format", "png", "--out", str(tmp_path / "png")])
    assert res.exit_code == 0, res.output


def test_an_unreadable_data_file_is_one_clear_error(ray_session, cli_runner, tmp_path):
    images = tmp_path / "imgs"
    write_png(images / "a.png")
    out = tmp_path / "out"
    assert label(cli_runner, images, out).exit_code == 0
    (out / "data" / "part-broken-0.parquet").write_bytes(b"PAR1 but not really")
    for args in (["inspect", str(out)], ["export", str(out), "--format", "coco", "--out",
                                         str(tmp_path / "c.json")]):
        res = cli_runner.invoke(cli, args)
        assert res.exit_code == 1, res.output
        assert "part-broken-0.parquet is not readable Parquet" in res.output
        assert "Traceback" not in res.output


# -- listing that terminates -----------------------------------------------------------------------
def test_symlink_loops_are_followed_once(ray_session, cli_runner, tmp_path):
    images = tmp_path / "loop1"
    write_png(images / "a.png", 1)
    write_png(images / "sub" / "b.png", 2)
    os.symlink(".", images / "again")              # a loop on itself
    os.symlink("..", images / "sub" / "up")        # a loop through the parent
    os.symlink("sub", images / "alias")            # a second name for a folder
    os.symlink("a.png", images / "same.png")       # a second name for a file
    res = label(cli_runner, images, tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert sorted(rows_of(tmp_path / "out")) == ["a.png", "sub/b.png"]


def test_special_files_and_bad_names_become_error_rows(ray_session, cli_runner, tmp_path):
    images = tmp_path / "imgs"
    write_png(images / "good.png")
    os.mkfifo(images / "pipe.png")
    bad_name = os.fsencode(images) + b"/bad\xff\xfe.png"
    with open(bad_name, "wb") as f:
        f.write(write_png(tmp_path / "x.png").read_bytes())
    manifest = tmp_path / "list.txt"
    fifo2 = tmp_path / "fifo.png"
    os.mkfifo(fifo2)
    manifest.write_text(f"{images / 'good.png'}\n{fifo2}\n/dev/zero\n")

    res = label(cli_runner, images, tmp_path / "out1")
    assert res.exit_code == 0, res.output
    rows = rows_of(tmp_path / "out1")
    assert rows["good.png"]["status"] == "ok"
    assert rows["pipe.png"]["status"] == "error" and "a FIFO, not an image file" in rows["pipe.png"]["error"]
    (bad,) = [r for i, r in rows.items() if i.startswith("bad")]
    assert bad["image_id"] == "bad\\xff\\xfe.png" and bad["status"] == "error"
    assert "the file name is not valid UTF-8 (shown escaped: bad\\xff\\xfe.png)" in bad["error"]

    res = label(cli_runner, manifest, tmp_path / "out2")
    assert res.exit_code == 0, res.output
    rows = rows_of(tmp_path / "out2")
    assert rows[str(images / "good.png")]["status"] == "ok"
    assert "a FIFO, not an image file" in rows[str(fifo2)]["error"]
    assert "a character device, not an image file" in rows["/dev/zero"]["error"]


# -- bounded reads and decodes -----------------------------------------------------------------------
def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def forged_png(width: int, height: int) -> bytes:
    """A few hundred bytes whose header declares width x height (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\0" * 1000)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", body)
            + _png_chunk(b"IEND", b""))


def truncated_big_jpeg(width: int, height: int) -> bytes:
    flat = np.full((64, 64, 3), 128, np.uint8)
    ok, buf = cv2.imencode(".jpg", flat)
    data = bytearray(buf.tobytes())
    pos = 2
    while data[pos + 1] not in (0xC0, 0xC1, 0xC2):
        pos += 2 + struct.unpack(">H", bytes(data[pos + 2:pos + 4]))[0]
    data[pos + 5:pos + 9] = struct.pack(">HH", height, width)
    return bytes(data[:629])


def test_bombs_and_forged_sizes_are_refused_before_decoding(ray_session, cli_runner, tmp_path):
    images = tmp_path / "imgs"
    write_png(images / "good.png")
    (images / "trunc8000.jpg").write_bytes(truncated_big_jpeg(8000, 8000))
    (images / "forged32000.png").write_bytes(forged_png(32000, 32000))
    (images / "big.bin.png").write_bytes(forged_png(20000, 20000))
    res = label(cli_runner, images, tmp_path / "out", "--max-bytes", "100000")
    assert res.exit_code == 0, res.output
    rows = rows_of(tmp_path / "out")
    assert rows["good.png"]["status"] == "ok"
    assert "truncated JPEG (8000x8000 declared, 629 bytes, no end marker); not decoded" in rows["trunc8000.jpg"]["error"]
    assert ("PNG declares 32000x32000 = 1,024,000,000 pixels, above the cap of 100,000,000 "
            "(--max-pixels); not decoded") in rows["forged32000.png"]["error"]
    assert "PNG declares 20000x20000" in rows["big.bin.png"]["error"]
    with open(images / "huge.png", "wb") as f:  # a byte cap: read no more than it
        f.write(b"\x89PNG" + b"\0" * 200_000)
    res = label(cli_runner, images, tmp_path / "out2", "--max-bytes", "100000")
    assert res.exit_code == 0, res.output
    assert "larger than the byte cap of 100,000 bytes (--max-bytes)" in rows_of(tmp_path / "out2")["huge.png"]["error"]


def test_16_bit_decoding_stays_near_9_bytes_per_pixel():
    from pipeline.store.decode import decode_image

    h, w = 1500, 2000
    rgb16 = (np.random.default_rng(0).integers(0, 65535, (h, w, 3))).astype(np.uint16)
    ok, buf = cv2.imencode(".png", rgb16, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    data = buf.tobytes()
    tracemalloc.start()
    try:
        rgb = decode_image(data, "big16.png")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rgb.dtype == np.uint8 and rgb.shape == (h, w, 3)
    assert int(rgb[0, 0, 0]) == round(int(rgb16[0, 0, 2]) / 257)  # BGR on disk, RGB out
    assert peak / (h * w) < 10, f"{peak / (h * w):.1f} bytes per pixel"


# -- secrets ------------------------------------------------------------------------------------------
def test_credentials_never_reach_ray_logs_or_records(tmp_path):
    """A fresh `drn-label run` with its own Ray temp dir: the secret is in the environment
    (workers need it to read s3://) but appears in none of the files Ray or the run writes."""
    write_png(tmp_path / "imgs" / "a.png")
    secret = "wJalrXUtnFEMI-K7MDENG-sentinel-" + os.urandom(6).hex()
    ray_tmp = tempfile.mkdtemp(prefix="drns-", dir="/tmp")
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": secret, "AWS_SESSION_TOKEN": secret + "-token",
           "RAY_TMPDIR": ray_tmp, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    try:
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(tmp_path / "imgs"),
                               str(tmp_path / "out"), *FLAGS], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        leaked = []
        for root in (Path(ray_tmp), tmp_path / "out"):
            for path in root.rglob("*"):
                if path.is_file() and not path.is_symlink():
                    try:
                        if secret.encode() in path.read_bytes():
                            leaked.append(str(path))
                    except OSError:
                        pass
        assert sum(1 for p in Path(ray_tmp).rglob("*.log")) > 0  # Ray did write its logs there
        assert leaked == []
    finally:
        subprocess.run(["rm", "-rf", ray_tmp], check=False)


def test_submit_refuses_credentials_in_env(cli_runner, tmp_path):
    res = cli_runner.invoke(cli, ["submit", str(tmp_path), str(tmp_path / "o"), "--address",
                                  "http://127.0.0.1:9", "--env", "AWS_SECRET_ACCESS_KEY=x"])
    assert res.exit_code == 2
    assert "AWS_SECRET_ACCESS_KEY looks like a credential" in res.output


# -- the smaller cases ------------------------------------------------------------------------------------
# Ids that used to collide or crash an export: one name for three images, a 300-character
# id (ENAMETOOLONG), a newline (splits CVAT's image list), a name that is also another id's
# folder, a path out of the folder, and letter case only.
EXPORT_IDS = ["a.jpg", "a.png", "a.txt", "L" * 300 + ".jpg", "two\nlines.png", "a.png/b.jpg",
              "../../outside.png", "Case.png", "case.png"]


def test_exports_never_collide_crash_or_half_write(ray_session, cli_runner, tmp_path):
    """Every format writes each image once under a name of its own (the same in every
    format), inside its folder, as one line of output; a target it cannot write is one
    error line and leaves nothing behind."""
    import yaml

    from pipeline.store.formats import ExportNames

    images = tmp_path / "imgs"
    paths = [write_png(images / f"{k}.png", k) for k in range(len(EXPORT_IDS))]
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"uri": [str(p) for p in paths], "image_id": EXPORT_IDS}), manifest)
    out = tmp_path / "out"
    res = label(cli_runner, manifest, out)
    assert res.exit_code == 0, res.output
    assert sorted(rows_of(out)) == sorted(EXPORT_IDS)
    exports = tmp_path / "exports"
    exports.mkdir()
    names = ExportNames(EXPORT_IDS)
    expected = {names.name(i) for i in EXPORT_IDS}
    assert len(expected) == len(EXPORT_IDS)  # the rule itself; the formats must follow it

    def export(fmt: str, target: Path):
        res = cli_runner.invoke(cli, ["export", str(out), "--format", fmt, "--out", str(target)])
        assert res.exit_code == 0, res.output
        assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1 + (fmt == "label-studio")
        assert f"exported {len(EXPORT_IDS)} images" in res.output
        return target

    png = export("png", exports / "png")
    assert {p.relative_to(png).as_posix()[:-4] for p in png.rglob("*.png") if p.is_file()} == expected
    assert all(len(p.name.encode()) <= 255 for p in png.rglob("*"))
    yolo = export("yolo", exports / "yolo")
    assert {p.relative_to(yolo / "labels").as_posix()[:-4] for p in yolo.rglob("*.txt") if p.is_file()} == expected
    assert len(yaml.safe_load((yolo / "data.yaml").read_text())["names"]) == 3
    cvat = export("cvat", exports / "cvat.zip")
    import warnings
    import zipfile

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a duplicate zip entry is a UserWarning
        with zipfile.ZipFile(cvat) as zf:
            members = zf.namelist()
            listed = zf.read("ImageSets/Segmentation/default.txt").decode().splitlines()
    assert len(members) == len(set(members))
    assert sorted(listed) == sorted(expected)
    assert {m[len("SegmentationClass/"):-4] for m in members if m.startswith("SegmentationClass/")} == expected
    coco = json.loads(export("coco", exports / "coco.json").read_text())
    assert sorted(i["file_name"] for i in coco["images"]) == sorted(EXPORT_IDS)
    tasks = json.loads(export("label-studio", exports / "tasks.json").read_text())
    assert sorted(t["data"]["image_id"] for t in tasks) == sorted(EXPORT_IDS)
    # Nothing outside the export folder ("../../outside.png" stayed in), nothing left over.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exports", "imgs", "m.parquet", "out"]
    assert sorted(p.name for p in exports.iterdir()) == ["coco.json", "cvat.zip", "png", "tasks.json",
                                                         "tasks_config.xml", "yolo"]

    # An OUTPUT that holds an image twice (written before duplicates were reconciled):
    # exported once, and said so.
    twice = tmp_path / "twice"
    shutil.copytree(out, twice)
    first = sorted((twice / "data").glob("part-*.parquet"))[0]
    shutil.copy(first, first.with_name("part-copy-0.parquet"))
    repeated = pq.read_table(first).num_rows
    res = cli_runner.invoke(cli, ["export", str(twice), "--format", "coco", "--out", str(exports / "c2.json")])
    assert res.exit_code == 0, res.output
    assert f"{repeated} duplicate rows skipped: OUTPUT holds those images twice" in res.output
    file_names = [i["file_name"] for i in json.loads((exports / "c2.json").read_text())["images"]]
    assert sorted(file_names) == sorted(EXPORT_IDS)
    shutil.rmtree(twice)

    # Targets that cannot be used: one line each, nothing half-written.
    folder = tmp_path / "existing"
    folder.mkdir()
    res = cli_runner.invoke(cli, ["export", str(out), "--format", "coco", "--out", str(folder)])
    assert res.exit_code == 2 and "is a folder; give the file to write" in res.output
    assert list(folder.iterdir()) == []
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for fmt, target in (("yolo", blocker / "yolo"), ("cvat", blocker / "c.zip")):
        res = cli_runner.invoke(cli, ["export", str(out), "--format", fmt, "--out", str(target)])
        assert res.exit_code == 1, res.output
        assert res.output.startswith(f"error: --out {target}: cannot write the {fmt} export (")
        assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".part")]


def test_an_image_id_twice_in_one_block_is_labelled_once(ray_session, cli_runner, tmp_path):
    """Manifest rows with one image_id close together (one block: a Parquet manifest's
    rows arrive in blocks of up to 1,024 consecutive rows): the first row's image is
    labelled, the others are dropped before decoding with a warning that counts them, and
    `inspect` shows the count. An older OUTPUT that holds the same rows twice (one run, one
    instant: what this used to commit) is reconciled by the next run to the first of them."""
    images = [write_png(tmp_path / "imgs" / f"{k}.png", k) for k in range(5)]
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"uri": [str(p) for p in images], "image_id": ["a", "b", "a", "c", "a"]}),
                   manifest)
    out = tmp_path / "out"
    res = label(cli_runner, manifest, out)
    assert res.exit_code == 0, res.output
    assert (f"warning: input {manifest}: 2 rows repeated the image_id of another row; one row of each "
            "image_id was labelled and kept, the first") in res.output
    assert "finished: 3 ok, 0 errors, 0 already labelled (of 3 inputs)" in res.output
    rows = rows_of(out)  # asserts one row per image_id
    assert {i: r["uri"] for i, r in rows.items()} == {"a": str(images[0]), "b": str(images[1]),
                                                      "c": str(images[3])}
    res = cli_runner.invoke(cli, ["inspect", str(out)])
    assert res.exit_code == 0 and "duplicate input rows 2 (one row kept each)" in res.output

    (first,) = (out / "data").glob("part-*.parquet")
    shutil.copy(first, first.with_name(first.name.replace("part-", "part-0")))  # sorts first
    res = label(cli_runner, manifest, out)
    assert res.exit_code == 0, res.output
    assert "removed 3 rows" in res.output
    rows = rows_of(out)
    assert sorted(rows) == ["a", "b", "c"] and rows["a"]["uri"] == str(images[0])


def test_status_of_an_empty_target_is_a_usage_error(cli_runner):
    res = cli_runner.invoke(cli, ["status", ""])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "TARGET is empty" in res.output


def test_an_interrupted_run_records_what_it_committed(tmp_path):
    """SIGTERM half way (as `drn-label stop` or Kubernetes send it): exit 143, the run record
    says interrupted and counts exactly the rows that are in OUTPUT, and so does the message,
    with the command that resumes (tests/e2e/test_cli_run.py does the same for Ctrl-C)."""
    images = tmp_path / "imgs"
    for k in range(120):
        write_png(images / f"{k:03d}.png", k, (48, 48))
    out = tmp_path / "out"
    ray_tmp = tempfile.mkdtemp(prefix="drni-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    args = ["run", str(images), str(out), "--num-classes", "3", "--batch-size", "2",
            "--rows-per-file", "5"]
    log = tmp_path / "run.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], env=env, stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(data_files(str(out))) < 3 and proc.poll() is None:
            time.sleep(0.5)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", ray_tmp], check=False)
    (record_path,) = (out / "_state" / "runs").glob("*.json")
    record = json.loads(record_path.read_text())
    committed = pq.read_table(data_files(str(out)), columns=["status"]).num_rows
    assert record["state"] == "interrupted"
    assert committed > 0
    assert record["counts"]["ok"] + record["counts"]["errors"] == committed
    assert record["counts"]["files"] == len(data_files(str(out)))
    text = log.read_text()
    assert f"\ninterrupted: {record['counts']['ok']} ok, {record['counts']['errors']} errors committed, " \
        in text, text[-2000:]
    assert ("rerun the same command to label the rest (nothing is labelled twice):\n  "
            f"{shlex.join(['drn-label', *args])}\n") in text, text[-2000:]
    assert "Traceback" not in text

# -- fuzz --------------------------------------------------------------------------------------------
def test_fuzzed_manifest_rows_each_become_one_row(ray_session, cli_runner, tmp_path):
    """A 300-row manifest from a fixed seed (tests/fuzz.py): mutated images, bad URLs,
    members of damaged shards, embedded rows, special files, odd image_ids. One row each,
    no crash, no hang, one-line errors, and no decode above a few MiB of traced memory."""
    from tests.fuzz import decode_peak_bytes, make_manifest_corpus

    manifest, expected = make_manifest_corpus(tmp_path / "corpus", 300, seed=0)
    images = sorted((tmp_path / "corpus" / "images").iterdir())
    assert max(decode_peak_bytes(p) for p in images) < 8 << 20
    res = label(cli_runner, manifest, tmp_path / "out", "--rows-per-file", "100")
    assert res.exit_code == 0, res.output
    rows = rows_of(tmp_path / "out")
    assert sorted(rows) == sorted(expected)
    statuses = Counter(r["status"] for r in rows.values())
    assert statuses["ok"] > 50 and statuses["error"] > 50  # both kinds really happen
    assert all(r["error"] and "\n" not in r["error"] for r in rows.values() if r["status"] == "error")
    kinds = " ".join(r["error"] for r in rows.values() if r["status"] == "error")
    for reason in ("malformed URL", "refused: ", "unsupported scheme", "a FIFO",
                   "not a decodable image", "past the end of the file"):
        assert reason in kinds, reason
