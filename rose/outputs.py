"""Nothing is lost: outputs go to a temporary sibling directory and are moved into place only when complete."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import RoseError


def check_output(out: Path, overwrite: bool) -> Path:
    """Validate an output directory before any expensive work."""
    out = Path(out).expanduser().absolute()
    if out.exists() and not overwrite:
        raise RoseError(f"output {out} already exists: choose another --out or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise RoseError(f"output {out} exists and is not a directory")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise RoseError(f"cannot write {out}: {parent} is a file, not a directory")
    try:  # permission bits lie on read-only mounts and for root: try for real
        fd, probe = tempfile.mkstemp(prefix=".rose-probe-", dir=parent)
    except OSError as exc:
        raise RoseError(f"cannot write under {parent} ({exc.strerror}): choose a writable --out") from None
    os.close(fd)
    os.unlink(probe)
    return out


@contextlib.contextmanager
def atomic_output(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `out`, on any failure it is removed."""
    out = check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
