"""The holder's own renewals: the heartbeat thread and the run's last check renew one lease
at the same time, and neither may mistake the other's write for another run's."""
from __future__ import annotations

import threading

from pipeline.store.lease import acquire_lease, lease_holder


def test_renewals_from_several_threads_keep_the_lease(tmp_path):
    output = str(tmp_path / "out")
    lease = acquire_lease(output, "run-a")
    start = threading.Barrier(4)
    results: list[bool] = []

    def renew_many() -> None:
        start.wait()
        results.extend(lease.renew() for _ in range(100))

    threads = [threading.Thread(target=renew_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert lease.lost is None, lease.lost
    assert results == [True] * 400
    assert lease_holder(output) == "run-a"
    lease.release()
    assert lease_holder(output) is None
