"""Shared fixtures: one real local Ray per test session, on loopback only."""
from __future__ import annotations

import os

import pytest

pytest_plugins = ["tests.s3server", "tests.gcsserver"]

# Keep every Ray process on 127.0.0.1 (Linux would otherwise pick the machine's address).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Before torch is imported: idle OpenMP threads sleep instead of spinning, which on 2 shared
# cores (Ray workers beside the test process) is the difference between 50 and 2 images/s.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The loopback image server answers in milliseconds; a short per-image deadline keeps the
# test of a server that trickles bytes short (Ray workers inherit it when Ray starts).
os.environ.setdefault("DRN_LABEL_HTTP_TIMEOUT", "4")


@pytest.fixture(scope="session")
def ray_session(s3_server, gcs_server):
    """A single local Ray instance (num_cpus=2) shared by every test that needs one.

    The S3 and GCS test servers start first: Ray workers copy the driver's environment
    (the endpoints and credentials) when Ray starts.
    """
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def spark_session():
    """One local SparkSession on loopback for the session (a JVM start costs seconds).
    pyspark brings Spark itself; it needs a Java runtime (17+) on PATH."""
    import shutil

    if shutil.which("java") is None:
        pytest.skip("Spark needs a Java runtime (java on PATH); none is installed here")
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master("local[1]").appName("drn-label-tests")
             .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
             .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "1")
             .getOrCreate())
    yield spark
    spark.stop()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny inputs: on shared cores extra intra-op threads only spin. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cli_runner():
    from click.testing import CliRunner

    return CliRunner()


def pytest_collection_modifyitems(config, items):
    """Everything under tests/e2e/ runs on real Ray or servers: `-m "not e2e"` leaves it out."""
    for item in items:
        if "e2e" in item.path.parts:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB filesystem of its own (tmpfs) at tmp_path/"fs", to fill up and free, or to
    make read-only (`small_fs.remount_read_only()`). Mounting needs root (CAP_SYS_ADMIN);
    elsewhere the test is skipped, saying so."""
    import subprocess

    mount = tmp_path / "fs"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({made.stderr.strip() or 'mount failed'}): "
                    "the storage fault tests need root")
    try:
        yield SmallFs(mount)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


class SmallFs:
    """A mounted tmpfs: `fill()` takes every free byte (a filler file), `free()` gives it back."""

    def __init__(self, root) -> None:
        self.root = root
        self.filler = root / ".filler"

    def fill(self) -> None:
        chunk = b"\0" * (64 << 10)
        with open(self.filler, "ab") as f:
            try:
                while True:
                    f.write(chunk)
                    f.flush()
            except OSError:
                pass
        while True:  # the last partial chunk too: not even a small file fits now
            try:
                with open(self.filler, "ab") as f:
                    f.write(b"\0" * 512)
            except OSError:
                return

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def mount_read_only(self, folder) -> None:
        """Mount a read-only tmpfs over `folder` (inside this filesystem)."""
        import subprocess

        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(folder)], check=True)
