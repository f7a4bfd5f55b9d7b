"""The table from input kind to the source that implements it.

`SOURCES` is asked in order: the first whose `plan` recognises INPUT lists it (a shard
before a plain file, an embedded-bytes Parquet file before a Parquet manifest), and the
first whose `reads` claims a URI reads it (files last: they take what no other claims).
A new input kind is one module with one `Source` and one entry here.
"""
from __future__ import annotations

from pipeline.store.sources import embedded, files, manifest, web, webdataset
from pipeline.store.sources.base import Source

SOURCES: tuple[Source, ...] = (webdataset.SOURCE, embedded.SOURCE, manifest.SOURCE,
                               web.SOURCE, files.SOURCE)

KINDS: dict[str, Source] = {kind: source for source in SOURCES for kind in source.kinds}
"""InputPlan.kind -> the source that lists it."""


def source_of(kind: str) -> Source:
    return KINDS[kind]


def reader_of(uri: str) -> Source:
    return next(source for source in SOURCES if source.reads(uri))
