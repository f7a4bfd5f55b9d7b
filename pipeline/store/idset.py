"""Sets of image ids that stay small: 128-bit digests, sorted, on disk past a threshold.

A run's shard writers must answer "is this image already labelled?" and "did this run
already commit this image?" for every input. Python sets of id strings cost about 100
bytes an id, 10-20 GB on the driver's node at 100 million. An `IdSet` holds a 16-byte
digest per id (blake2b): the ids added recently in memory, the rest as one sorted array in
a memory-mapped file that the kernel pages in and out, merged when the recent part
exceeds `spill_at`. Two ids share a 128-bit digest with a probability of about n^2 / 2^129
(below 10^-22 at 100 million ids).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from typing import Iterable

import numpy as np

DIGEST = np.dtype([("hi", "<u8"), ("lo", "<u8")])
"""A 128-bit digest as two unsigned 64-bit halves: arrays of them sort with np.sort."""
SPILL_AT = 1_000_000
"""Digests an IdSet keeps in memory (16 MB) before it merges them into its file."""


def digests(ids: Iterable[str]) -> np.ndarray:
    """The 128-bit digests of `ids`, in order (a `DIGEST` array)."""
    raw = b"".join(hashlib.blake2b(i.encode("utf-8", "surrogateescape"), digest_size=16).digest()
                   for i in ids)
    return np.frombuffer(raw, dtype=DIGEST).copy()


def _member(hi: np.ndarray, lo: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Which `keys` (a DIGEST array) occur among the sorted pairs (`hi`, `lo`)."""
    found = np.zeros(len(keys), dtype=bool)
    if not len(hi) or not len(keys):
        return found
    q_hi, q_lo = keys["hi"], keys["lo"]
    at = np.searchsorted(hi, q_hi, side="left")
    inside = at < len(hi)
    at_c = np.minimum(at, len(hi) - 1)
    same_hi = inside & (hi[at_c] == q_hi)
    found = same_hi & (lo[at_c] == q_lo)
    # Keys whose high half repeats in the set (about n^2 / 2^65 of them): look further.
    for k in np.flatnonzero(same_hi & ~found):
        j = at_c[k] + 1
        while j < len(hi) and hi[j] == q_hi[k] and not found[k]:
            found[k] = lo[j] == q_lo[k]
            j += 1
    return found


class IdSet:
    """A set of ids (see the module doc). `directory` holds its file once it spills;
    `close` removes it."""

    def __init__(self, directory: str | None = None, *, spill_at: int = SPILL_AT) -> None:
        self.directory = directory or tempfile.gettempdir()
        self.spill_at = spill_at
        self._file: str | None = None
        # Sorted by (hi, lo): a 2 x n uint64 array, memory-mapped once spilled.
        self._pairs = np.empty((2, 0), dtype=np.uint64)
        self._recent: set[bytes] = set()

    def __len__(self) -> int:
        return self._pairs.shape[1] + len(self._recent)

    def _sorted(self) -> np.ndarray:
        out = np.empty(self._pairs.shape[1], dtype=DIGEST)
        out["hi"], out["lo"] = self._pairs[0], self._pairs[1]
        return out

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """Which of `keys` (a DIGEST array) are in the set."""
        found = _member(self._pairs[0], self._pairs[1], keys)
        if self._recent:
            raw = keys.tobytes()
            found |= np.fromiter((raw[16 * k:16 * k + 16] in self._recent for k in range(len(keys))),
                                 dtype=bool, count=len(keys))
        return found

    def add(self, keys: np.ndarray) -> None:
        """Add `keys` (a DIGEST array; repeats are fine)."""
        raw = keys.tobytes()
        self._recent.update(raw[16 * k:16 * k + 16] for k in range(len(keys)))
        if len(self._recent) >= self.spill_at:
            self._merge()

    def add_sorted(self, parts: Iterable[np.ndarray]) -> int:
        """Start from `parts` (DIGEST arrays), merged into the sorted file at once (the
        done set read from OUTPUT); returns how many keys repeated one already added."""
        arrays = [np.asarray(p, dtype=DIGEST) for p in parts if len(p)]
        if not arrays:
            return 0
        merged = np.sort(np.concatenate([self._sorted(), *arrays]))
        unique = np.concatenate([[True], merged[1:] != merged[:-1]]) if len(merged) else merged
        repeats = int(len(merged) - np.count_nonzero(unique))
        self._store(merged[unique])
        return repeats

    def _merge(self) -> None:
        recent = np.frombuffer(b"".join(self._recent), dtype=DIGEST)
        self._recent = set()
        merged = np.union1d(self._sorted(), recent)  # sorted, without repeats
        self._store(merged)

    def _store(self, merged: np.ndarray) -> None:
        """Keep `merged` (sorted) small in memory: below `spill_at` as an array, else in a
        new file mapped read-only (the old file is removed)."""
        old = self._file
        pairs = np.stack([merged["hi"], merged["lo"]])
        if len(merged) < self.spill_at:
            self._file, self._pairs = None, pairs
        else:
            os.makedirs(self.directory, exist_ok=True)
            path = os.path.join(self.directory, f".drn-label-ids-{uuid.uuid4().hex}.npy")
            np.save(path, pairs)
            del pairs
            self._file, self._pairs = path, np.load(path, mmap_mode="r")
        if old:
            os.unlink(old)

    def close(self) -> None:
        """Remove the set's file (the set is empty afterwards)."""
        self._pairs, self._recent = np.empty((2, 0), dtype=np.uint64), set()
        if self._file:
            try:
                os.unlink(self._file)
            except FileNotFoundError:
                pass
            self._file = None
