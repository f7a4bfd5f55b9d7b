"""Where images come from: list INPUT, read the bytes of what it lists.

INPUT is one of (each kind is one module of this package, behind one interface,
`base.Source`; `registry.SOURCES` is the table from kind to implementation):
- a directory (local, ``s3://bucket/prefix`` or ``gs://bucket/prefix``), listed recursively;
  image_id is the path relative to it with forward slashes (`files`);
- a glob (``photos/**/*.jpg``, ``s3://bucket/raw/*/cam?.png``): ``*``, ``?`` and ``[...]``
  stay within one folder, ``**`` spans any number of folders, matching is case-sensitive
  as in a shell; image_id is relative to the glob's folder before the first wildcard
  (`files`);
- a single image file (image_id: its file name) (`files`);
- a manifest: ``.txt``, ``.csv`` or ``.parquet`` whose rows name images anywhere below
  (`manifest`), including http(s) URLs (`web`);
- a Parquet file whose image column holds the bytes (`embedded`);
- WebDataset shards: a ``.tar`` file or a glob of them (`webdataset`).
Files and folders whose names start with "." are skipped by directory and glob listings.

Planning (`plan_inputs`) takes a few metadata calls; listing (`list_unit`) streams unit by
unit; reading (`read_all`) takes a batch and answers every URI with its bytes or a
ReadError, by one retry rule (`retry`).
"""
from __future__ import annotations

from pipeline.store.fs import resolve, to_uri
from pipeline.store.sources.base import (DEFAULT_MAX_BYTES, IMAGE_EXTENSIONS, INPUT_SCHEMA,
                                         InputError, InputPlan, ReadError, ReadOptions, Source,
                                         TooLarge)
from pipeline.store.sources.files import glob_to_regex
from pipeline.store.sources.planning import (list_inputs, list_unit, list_units,
                                             must_list_something, no_inputs_error, plan_inputs)
from pipeline.store.sources.reading import read_all, read_bytes
from pipeline.store.sources.retry import is_transient
from pipeline.store.sources.walk import special_file_kind, walk_local

__all__ = [
    "DEFAULT_MAX_BYTES", "IMAGE_EXTENSIONS", "INPUT_SCHEMA", "InputError", "InputPlan",
    "ReadError", "ReadOptions", "Source", "TooLarge", "glob_to_regex", "is_transient",
    "list_inputs", "list_unit", "list_units", "must_list_something", "no_inputs_error",
    "plan_inputs", "read_all", "read_bytes", "resolve", "special_file_kind", "to_uri",
    "walk_local",
]
