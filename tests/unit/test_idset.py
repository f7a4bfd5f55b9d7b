"""IdSet: the shard writers' done and seen sets as sorted 128-bit digests, spilled to a
mapped file; the same answers as a Python set of the ids, before and after a spill."""
from __future__ import annotations

import os
import random

import numpy as np
import pyarrow as pa

from pipeline.job.commit import digest_piece
from pipeline.store.idset import IdSet, digests


def test_answers_like_a_set_of_the_ids_across_spills(tmp_path):
    rng = random.Random(7)
    ids = [f"img-{rng.getrandbits(40):x}.jpg" for _ in range(5000)] + ["é/ünï code.png", "a\nb", ""]
    truth: set[str] = set()
    ids_set = IdSet(str(tmp_path), spill_at=700)
    for start in range(0, len(ids), 450):
        part = ids[start:start + 450]
        ids_set.add(digests(part + part[:10]))  # repeats are fine
        truth.update(part)
        probe = part[::3] + [f"absent-{k}" for k in range(50)] + ids[:20]
        assert ids_set.contains(digests(probe)).tolist() == [p in truth for p in probe]
    assert len(ids_set) <= len(truth) + 700  # recent digests may repeat spilled ones until merged
    assert [f for f in os.listdir(tmp_path) if f.startswith(".drn-label-ids-")], "it spilled"
    ids_set.close()
    assert not os.listdir(tmp_path)
    assert not ids_set.contains(digests(ids[:5])).any()


def test_a_done_set_counts_repeated_ids_and_keeps_skipped_statuses(tmp_path):
    piece = pa.table({"image_id": ["a", "b", "c", "a"], "status": ["ok", "error", "ok", "ok"]})
    keys, skip = digest_piece(piece, ("ok",))
    assert np.array_equal(keys, np.sort(digests(["a", "b", "c", "a"])))
    done = IdSet(str(tmp_path), spill_at=2)
    assert done.add_sorted([keys, np.sort(digests(["c", "d"]))]) == 2  # "a" twice, "c" twice
    assert done.contains(digests(["a", "b", "c", "d", "e"])).tolist() == [True] * 4 + [False]
    retry = IdSet(str(tmp_path))
    retry.add_sorted([skip])
    assert retry.contains(digests(["a", "b", "c"])).tolist() == [True, False, True]
    assert digest_piece(piece, ("ok", "error"))[1] is None  # every status skipped: one set
    done.close()
    retry.close()
