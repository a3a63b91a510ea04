"""`manifest.json`: what an export holds (files, sizes, sha256), what it left dense and why, what it verified."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
EXTRA_PACKAGES = ("onnxruntime-gpu", "onnxruntime", "onnxscript", "onnx-ir", "compressed-tensors")


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entries(root: Path, directory: Path) -> list[dict[str, Any]]:
    """Every file under `directory`, with its path relative to `root`, size and sha256."""
    return [{"path": f.relative_to(root).as_posix(), "bytes": f.stat().st_size, "sha256": sha256(f)}
            for f in sorted(directory.rglob("*")) if f.is_file()]


def versions() -> dict[str, str]:
    """The recipe's library versions plus the exporters' and runtimes'."""
    import importlib.metadata as md

    from rose.config import versions as rose_versions

    out = rose_versions()
    for pkg in EXTRA_PACKAGES:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


def build(root: Path, source: dict[str, Any], formats: dict[str, dict[str, Any]], skipped: dict[str, Any],
          parity: dict[str, Any]) -> dict[str, Any]:
    """Assemble the manifest once every format directory under `root` is complete."""
    for name, info in formats.items():
        info["files"] = file_entries(root, root / name)
        info["bytes"] = sum(f["bytes"] for f in info["files"])
    return {"version": MANIFEST_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "source": source,
            "formats": formats, "skipped": skipped, "parity": parity, "versions": versions()}


def write(root: Path, manifest: dict[str, Any]) -> Path:
    path = root / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def load(root: Path) -> dict[str, Any]:
    return json.loads((Path(root) / MANIFEST).read_text())
