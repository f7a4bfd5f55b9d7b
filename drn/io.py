"""Local-file helpers shared by the library and the pipeline. No torch here."""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import IO, Any, Iterator

__all__ = ["atomic_write"]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """Write ``path`` all at once: readers see the old file or the whole new one, never part.

    Yields a file opened on ``.<name>.<uuid>.part`` in the same folder (so the rename
    stays on one filesystem). When the block ends without an exception the file is closed
    and renamed over ``path`` (``os.replace``); on an exception it is removed and ``path``
    is left as it was. The file gets the usual permissions (0o666 less the umask), as a
    plain ``open`` would give it. ``mode`` is ``"wb"`` or ``"w"`` (text; ``open_kwargs``
    such as ``encoding`` go to ``open``). The folder must exist.

        with atomic_write(out / "table.json", "w", encoding="utf-8") as f:
            json.dump(data, f)
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    part = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    # "x": create a new file (O_EXCL) with mode 0o666 & ~umask, never reuse another's.
    f = open(part, mode.replace("w", "x"), **open_kwargs)
    try:
        with f:
            yield f
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
