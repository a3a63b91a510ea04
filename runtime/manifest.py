"""The hash check of every runtime loader, without torch (`runtime.ort` uses it too): every file that the export's
`manifest.json` lists for a format directory must still have its recorded size and sha256."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from .errors import RoseRuntimeError, first_line

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_files(directory: Path, verify: bool = True, *, files: str | None = None, strict: bool = True) -> bool:
    """Check the files that the export's manifest lists for `directory` (size and sha256); True when checked.
    `files`: only those whose name starts with it (a session reads `model.onnx*`, not the configs beside it).
    `strict=False`: a manifest that does not describe `directory` means the directory is not rose's export, and
    nothing is checked (for a reader of any ONNX graph); rose's packed loaders read only rose's formats, so for them
    it is an error."""
    directory = Path(directory)
    manifest = directory.parent / MANIFEST
    if not verify:
        return False
    if not manifest.is_file():
        log.info("%s has no %s beside it: file hashes not checked (structure only)", directory, MANIFEST)
        return False
    try:
        entries = json.loads(manifest.read_text())["formats"][directory.name]["files"]
        entries = [e for e in entries if files is None or Path(e["path"]).name.startswith(files)]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if not strict:
            log.info("%s does not describe %s/: file hashes not checked", manifest, directory.name)
            return False
        raise RoseRuntimeError(f"{manifest} does not describe {directory.name}/ ({first_line(exc)[:80]}): re-export "
                               f"it, or pass verify=False to skip the hash check") from None
    for entry in entries:
        path = directory.parent / entry["path"]
        if not path.is_file():
            raise RoseRuntimeError(f"{path} is missing, though {manifest.name} lists it: re-export the model")
        if path.stat().st_size != entry["bytes"] or sha256(path) != entry["sha256"]:
            raise RoseRuntimeError(f"{path} does not match its size and sha256 in {manifest.name}: it changed or was "
                                   f"damaged after the export; re-export it (verify=False loads it unchecked)")
    return True
