"""Nothing is lost: outputs are written in a hidden sibling and swapped into place only when complete.

- `--out` may not be, contain or lie inside an input (compared after resolving `..`, symlinks and trailing `/`).
- `--overwrite` replaces only a directory that rose wrote (its `rose_recipe.json`, `manifest.json` or a
  benchmark's `results.json` says so) or an empty one; anything else is a one-line refusal naming it.
- The swap survives a kill at any point: on Linux the new and the old directory trade places in one atomic
  `renameat2(RENAME_EXCHANGE)`; elsewhere (or on a file system without it) the complete copy is first renamed to
  `.ready`, and a later run finishes or undoes a swap that a kill interrupted.
- Hidden siblings of a killed run (`.<name>.rose-<pid>-*`) are removed by the next run that writes the same
  output, with a log line.
- Outputs get ordinary permissions (the user's umask), not the 0700/0600 of temporary files.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import RoseError

log = logging.getLogger(__name__)

# (file, keys it must hold): how rose recognises a directory it wrote
MARKERS = (("rose_recipe.json", ("model", "config", "version")), ("manifest.json", ("formats", "version")),
           ("results.json", ("benchmark", "version", "records")))
_HIDDEN = re.compile(r"^\.(?P<name>.+)\.rose-(?P<pid>\d+)-[^.]*\.(?P<state>partial|ready|old)$")
_RENAME_EXCHANGE = 2


def resolved(path: Path | str) -> Path:
    return Path(path).expanduser().resolve()


def is_rose_output(directory: Path) -> bool:
    """True when `directory` holds one of the files rose writes at the top of an output, with its keys."""
    for name, keys in MARKERS:
        try:
            data = json.loads((directory / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and all(k in data for k in keys):
            return True
    return False


def check_inputs(out: Path, inputs: Iterable[tuple[str, str | Path | None]]) -> None:
    """`--out` may not equal, contain or lie inside an input (`(flag, path)`; names that are not local paths, a hub
    id or `wikitext2`, are skipped)."""
    target = resolved(out)
    for flag, value in inputs:
        if value is None or not Path(str(value)).expanduser().exists():
            continue
        source = resolved(value)
        if target == source:
            how = "is"
        elif target in source.parents:
            how = "contains"
        elif source in target.parents:
            how = "lies inside"
        else:
            continue
        raise RoseError(f"--out {out} {how} the input {flag} {value}: choose an --out outside every input")


def check_output(out: Path, overwrite: bool, inputs: Iterable[tuple[str, str | Path | None]] = ()) -> Path:
    """Validate an output directory before any expensive work; returns it resolved. What a killed run left is
    tidied first, so that a previous copy it restores counts as existing (and needs --overwrite)."""
    check_inputs(out, inputs)
    target = resolved(out)
    if target.parent.is_dir():
        recover(target)
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise RoseError(f"output {out} already exists: choose another --out or pass --overwrite")
        if not target.is_dir():
            raise RoseError(f"output {out} exists and is not a directory: choose another --out")
        if not is_rose_output(target) and any(target.iterdir()):
            raise RoseError(f"--overwrite replaces only a directory that rose wrote (with rose_recipe.json, "
                            f"manifest.json or a benchmark's results.json), and {out} is not one: choose another "
                            f"--out, or move it away yourself")
    parent = target.parent
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
    return target


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def recover(target: Path) -> None:
    """Tidy what a killed run left beside `target`: finish a swap it had prepared (`.ready` while `target` is
    missing), restore the previous copy (`.old` while `target` is missing), and remove the rest."""
    stale = {"partial": [], "ready": [], "old": []}
    for entry in target.parent.glob(f".{target.name}.rose-*"):
        m = _HIDDEN.match(entry.name)
        if m and m["name"] == target.name and not _alive(int(m["pid"])):
            stale[m["state"]].append(entry)
    if not target.exists():
        for state in ("ready", "old"):  # the newest complete copy wins, else the previous one
            if stale[state]:
                keep = max(stale[state], key=lambda p: p.stat().st_mtime)
                keep.rename(target)
                stale[state].remove(keep)
                log.warning("%s: restored the %s copy that a killed run left in %s", target,
                            "new" if state == "ready" else "previous", keep.name)
                break
    for entry in [p for paths in stale.values() for p in paths]:
        shutil.rmtree(entry, ignore_errors=True)
        log.warning("removed %s, left by a killed run", entry)


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:  # pragma: no cover - not Linux
        pass
    mask = os.umask(0o022)  # pragma: no cover
    os.umask(mask)  # pragma: no cover
    return mask  # pragma: no cover


def ordinary_permissions(root: Path) -> None:
    """What `save_pretrained` into a normal directory gives: directories 0777 and files 0666 (0777 where
    executable) less the umask, instead of the 0700/0600 of temporary files."""
    mask = _umask()
    root.chmod(0o777 & ~mask)
    for path in root.rglob("*"):
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(0o777 & ~mask)
        else:
            path.chmod((0o777 if path.stat().st_mode & 0o111 else 0o666) & ~mask)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    at_fdcwd = -100
    if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a))


def _step(name: str) -> None:
    """A named point of the swap; tests kill the process here to prove that no point loses the output."""


def swap_into_place(tmp: Path, target: Path) -> None:
    """Move the complete `tmp` to `target`, replacing what is there, so that a kill at any point leaves either
    the old or the new output at `target` (or, on the fallback path, a copy that `recover` puts back)."""
    if not target.exists():
        _step("rename")
        tmp.rename(target)
        return
    _step("exchange")
    if _exchange(tmp, target):
        _step("exchanged")
        shutil.rmtree(tmp, ignore_errors=True)  # now the previous output
        return
    stem = tmp.name[: -len(".partial")]
    ready, old = tmp.with_name(stem + ".ready"), tmp.with_name(stem + ".old")
    tmp.rename(ready)
    _step("ready")
    target.rename(old)
    _step("moved-old")
    ready.rename(target)
    _step("moved-new")
    shutil.rmtree(old, ignore_errors=True)


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC or a full quota, as the OS, safetensors (Rust) or protobuf report it."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text


@contextlib.contextmanager
def atomic_output(out: Path, overwrite: bool = False,
                  inputs: Iterable[tuple[str, str | Path | None]] = ()) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `out` (see the module's rules), on any failure it is
    removed. A full disk is a one-line error."""
    target = check_output(out, overwrite, inputs)  # has tidied what killed runs left beside it
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.rose-{os.getpid()}-", suffix=".partial",
                                dir=target.parent))
    try:
        yield tmp
        ordinary_permissions(tmp)
        swap_into_place(tmp, target)
    except BaseException as exc:
        if is_disk_full(exc):
            raise RoseError(f"no space left on the device of {out} while writing it (nothing was left there): free "
                            f"space or choose another --out") from None
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
