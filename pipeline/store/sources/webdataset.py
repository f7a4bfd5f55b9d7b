"""WebDataset shards: a ``.tar`` file, or a glob of them (``shards/*.tar``), one image member
per key (the member name up to the first dot of its base name). image_id is the key
(``<shard path relative to the glob's folder>/<key>`` for a glob of shards); the row's
uri is ``<shard>#<member>@<offset>+<size>``: a ranged read, nothing unpacked.

A shard is listed from its tar headers. A shard that is not a tar file, or is cut short,
keeps the keys listed before the damage and adds one error row named after the shard;
a key with two image members becomes an error row of its own. The other shards of a
glob are labelled as usual.
"""
from __future__ import annotations

import posixpath
import re
import tarfile
from typing import Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.store.fs import open_random_access, open_range, resolve, to_uri
from pipeline.store.sources.base import (IMAGE_EXTENSIONS, IMAGE_RE, INPUT_SCHEMA, InputError,
                                         InputPlan, ReadError, ReadOptions, Source, Target,
                                         one_line, too_large)
from pipeline.store.sources.files import glob_to_regex, list_files, listing_units
from pipeline.store.sources.retry import reason, with_retries

MEMBER_RE = re.compile(r"^(?P<file>.+\.tar)#(?P<member>.+)@(?P<offset>\d+)\+(?P<size>\d+)$",
                       re.IGNORECASE)


class WebDatasetSource(Source):
    kinds = ("tar", "shards")

    def plan(self, target: Target) -> InputPlan | None:
        if target.is_glob:
            if not target.glob_pattern.lower().endswith(".tar"):
                return None
            pattern = target.glob_pattern
            recursive = "/" in pattern or "**" in pattern
            units = listing_units(target.fs, target.glob_base) if recursive else ("",)
            return InputPlan(target.input, "shards", target.scheme, target.glob_base,
                             glob_to_regex(pattern), recursive, units=units)
        if target.info.type == pafs.FileType.File and target.path.lower().endswith(".tar"):
            return InputPlan(target.input, "tar", target.scheme, target.path)
        return None

    def list(self, plan: InputPlan, unit: str, *, block_rows: int = 0) -> Iterator[pa.Table]:
        fs, _ = resolve(plan.input)
        if plan.kind == "tar":
            table = _list_shard(fs, plan.scheme, plan.path, posixpath.basename(plan.path), None)
            if table.num_rows == 0:
                raise InputError(f"input {plan.input}: no image members in the shard; WebDataset "
                                 f"shards hold <key>.<ext> members with ext one of "
                                 f"{', '.join(IMAGE_EXTENSIONS)}")
            yield table
            return
        prefix = plan.path.rstrip("/") + "/"
        for shard in sorted(list_files(plan, unit)["path"].to_pylist()):
            yield _list_shard(fs, plan.scheme, shard, shard[len(prefix):], shard[len(prefix):])

    def reads(self, uri: str) -> bool:
        return MEMBER_RE.match(uri) is not None

    def read(self, uris: list[str], options: ReadOptions) -> list[bytes | ReadError]:
        out: list[bytes | ReadError] = []
        for uri in uris:
            match = MEMBER_RE.match(uri)
            offset, size = int(match["offset"]), int(match["size"])
            if size > options.max_bytes:  # the tar header says how big: never read
                out.append(ReadError(uri, too_large(options.max_bytes), 1, False))
                continue
            try:
                out.append(with_retries(uri, lambda: _read_range(match["file"], offset, size),
                                        retries=options.retries, backoff=options.backoff))
            except ReadError as exc:
                out.append(exc)
        return out


def _list_shard(fs: pafs.FileSystem, scheme: str, shard: str, name: str,
                key_prefix: str | None) -> pa.Table:
    """One row per key of `shard`: its one image member, located by offset and size; a
    damaged shard adds one error row (image_id `name`) after the keys read before the damage.
    image_id is the key, or `<key_prefix>/<key>`."""
    shard_uri = to_uri(scheme, shard)
    keys: dict[str, list[tuple[str, int, int]]] = {}
    damage = None
    try:
        with open_random_access(fs, shard) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, base_name = posixpath.split(member.name)
                stem, dot, ext = base_name.partition(".")
                if not dot or not re.search(IMAGE_RE, "." + ext.rsplit(".", 1)[-1]):
                    continue  # .json, .cls, .txt, ...: not the image
                keys.setdefault(posixpath.join(folder, stem), []).append(
                    (member.name, member.offset_data, member.size))
            # tarfile takes a header cut short for the end of the archive; a complete shard
            # has only zero blocks (the end marker) where the members stop
            end, size = tar.offset, f.size()
            if end < size and f.read_at(min(size - end, 512), end).strip(b"\0"):
                raise tarfile.ReadError(f"bytes at offset {end} are not a tar header")
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        listed = sum(len(members) for members in keys.values())
        rest = (f"the members after its first {listed} images were not listed" if listed
                else "none of its images were listed")
        damage = f"not a readable tar file ({one_line(reason(exc))}); {rest}"
    image_ids, uris, errors = [], [], []
    for key, members in keys.items():
        image_ids.append(key if key_prefix is None else f"{key_prefix}/{key}")
        member, offset, size = members[0]
        uris.append(f"{shard_uri}#{member}@{offset}+{size}")
        errors.append(None if len(members) == 1 else
                      f"the shard holds {len(members)} images for key {key!r} "
                      f"({', '.join(m for m, _, _ in members)}); WebDataset shards need one "
                      "image member per key")
    if damage:
        image_ids.append(name)
        uris.append(shard_uri)
        errors.append(damage)
    return pa.table({"image_id": image_ids, "uri": uris, "error": errors}, schema=INPUT_SCHEMA)


def _read_range(file_uri: str, offset: int, size: int) -> bytes:
    fs, path = resolve(file_uri)
    data = open_range(fs, path, offset, size)
    if len(data) != size:
        raise ValueError(f"the shard ends before the member's {size} bytes (truncated)")
    return data


SOURCE = WebDatasetSource()
