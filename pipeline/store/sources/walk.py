"""Walking a local folder tree: terminates on any tree, lists each file once, never opens
what is not a regular file."""
from __future__ import annotations

import os
import stat
from typing import Iterator

_SPECIAL = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def special_file_kind(mode: int) -> str | None:
    """What a non-regular, non-directory file is ("a FIFO", ...), None for a regular file."""
    for test, kind in _SPECIAL:
        if test(mode):
            return kind
    return None if stat.S_ISREG(mode) else "not a regular file"


def walk_local(base: str, *, recursive: bool = True) -> Iterator[tuple[str, str, str | None]]:
    """(path, path relative to base, error or None) of each file under local folder `base`.

    Terminates on any tree: a directory is entered at most once per real directory
    (device, inode), so symlink loops and links to folders already seen add nothing; each
    regular file is listed once. Real names win over symlinked ones: the tree is walked
    without following symlinks first, and symlinks are followed afterwards only to what
    was not seen. Names starting with "." are skipped. Names that are not valid UTF-8 are
    listed with an error that shows the name escaped; FIFOs, devices, sockets and broken
    symlinks are listed with an error (never opened, so never waited on).
    """
    root = os.fsencode(base.rstrip("/") or "/")
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()
    try:
        st = os.stat(root)
    except OSError:
        return
    seen_dirs.add((st.st_dev, st.st_ino))

    def visit(rel: bytes, st: os.stat_result, walk_later: list[bytes]):
        """A folder not seen yet goes onto `walk_later`; a file becomes its listing row
        (None for a second name of a file already listed)."""
        if stat.S_ISDIR(st.st_mode):
            if recursive and (st.st_dev, st.st_ino) not in seen_dirs:
                seen_dirs.add((st.st_dev, st.st_ino))
                walk_later.append(rel)
            return None
        return _file_once(root, rel, st, seen_files)

    folders: list[bytes] = [b""]      # real folders still to walk
    links: list[bytes] = []           # symlinks met on the way, followed after the walk
    while folders or links:
        if folders:
            rel_dir = folders.pop()
            folder = os.path.join(root, rel_dir) if rel_dir else root
            try:
                with os.scandir(folder) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError:
                continue  # unreadable folder: nothing to list in it
            subdirs = []
            for entry in entries:
                if entry.name.startswith(b"."):
                    continue
                rel = os.path.join(rel_dir, entry.name) if rel_dir else entry.name
                if entry.is_symlink():
                    links.append(rel)
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                listed = visit(rel, st, subdirs)
                if listed:
                    yield listed
            folders.extend(reversed(subdirs))
            continue
        rel = links.pop(0)
        try:
            st = os.stat(os.path.join(root, rel))
        except OSError:
            yield _listed_file(root, rel, "a broken symbolic link (its target does not exist)")
            continue
        listed = visit(rel, st, folders)
        if listed:
            yield listed


def _file_once(root: bytes, rel: bytes, st: os.stat_result,
               seen_files: set[tuple[int, int]]) -> tuple[str, str, str | None] | None:
    if stat.S_ISREG(st.st_mode):
        key = (st.st_dev, st.st_ino)
        if key in seen_files:
            return None
        seen_files.add(key)
        return _listed_file(root, rel, None)
    return _listed_file(root, rel, f"{special_file_kind(st.st_mode)}, not an image file")


def _listed_file(root: bytes, rel: bytes, error: str | None) -> tuple[str, str, str | None]:
    path = os.path.join(root, rel)
    try:
        return path.decode("utf-8"), rel.decode("utf-8"), error
    except UnicodeDecodeError:
        shown = rel.decode("utf-8", "backslashreplace")
        full = path.decode("utf-8", "backslashreplace")
        return full, shown, (f"the file name is not valid UTF-8 (shown escaped: {shown}); "
                             "rename the file to label it")
