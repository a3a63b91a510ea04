"""Calibration and evaluation text through `datasets`: hub names (`wikitext2`, `c4`) or local files, and `pydoc`,
a text that ships with Python itself.

`pydoc` is the documentation of Python's language and built-ins that `help()` shows: the standard library module
`pydoc_data.topics` (PSF license, shipped with every CPython), its topics joined in sorted order. It is a second
domain (technical English with code and grammar rules) that WikiText calibration never sees, and needs no network
and no download; the text follows the Python release, which every recipe records (`versions.python`).
"""
from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path

import torch

from .errors import RoseError, first_line
from .hub import hub_reachable

LOCAL_BUILDERS = {".txt": "text", ".tokens": "text", ".raw": "text", ".jsonl": "json", ".json": "json",
                  ".parquet": "parquet"}
HUB_SPLITS = {  # name -> (path, config, calibration split, evaluation split)
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "test"),
    "c4": ("allenai/c4", None, "train", "validation"),
}
BUILTIN = ("pydoc",)   # sources that ship with Python and need neither a hub nor a file
C4_FILES = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}


def pydoc_rows() -> list[str]:
    """The topics of Python's own documentation (`pydoc_data.topics`, PSF license), in sorted order."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions split the module off
        raise RoseError("data source 'pydoc' needs the standard library module pydoc_data, which this Python "
                        "lacks") from None
    return [topics[k] for k in sorted(topics)]


def is_local(source: str) -> bool:
    """A file name (by its suffix or because it exists), as opposed to a hub name like `wikitext2`."""
    path = Path(source).expanduser()
    return path.suffix in LOCAL_BUILDERS or path.exists() or os.sep in source


def check_sources(*sources: str) -> None:
    """Before any heavy work: every local file exists and every other name is one rose knows."""
    for source in sources:
        if is_local(source):
            if not Path(source).expanduser().is_file():
                raise RoseError(f"calibration/evaluation file {source} does not exist (or is not a file)")
        elif source not in HUB_SPLITS and source not in BUILTIN:
            raise RoseError(f"unknown data source {source!r}: use wikitext2, c4, pydoc, or a .txt/.jsonl/.parquet "
                            f"file")


@contextlib.contextmanager
def _quiet_datasets():
    """datasets and pyarrow log their own errors before raising; rose reports one line instead."""
    import datasets

    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL + 10)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)


def text_rows(path: Path) -> list[str]:
    """The rows `datasets`' text builder gives for a local text file, read without `datasets`: the file read as
    UTF-8 with universal newlines, split at each newline, the newline dropped (then `load_rows` keeps the rows that
    are not blank). For machines where `datasets` cannot be imported (the GPU image has none)."""
    with open(path, encoding="utf-8") as f:
        return f.read().split("\n")


def _datasets():
    """The `datasets` module, or None where it cannot be imported."""
    try:
        import datasets
    except Exception:  # noqa: BLE001 - missing, or broken beside this pyarrow: local text files do without it
        return None
    return datasets


def load_rows(source: str, split: str = "train") -> list[str]:
    """Text rows of a local file (one row per line for text, the `text` field otherwise), a hub dataset, or a
    built-in source (`pydoc`: one row per topic; it has no splits)."""
    check_sources(source)
    if source in BUILTIN and not is_local(source):
        return [t for t in pydoc_rows() if t.strip()]
    path = Path(source).expanduser()
    datasets = _datasets()
    if datasets is None:
        if is_local(source) and LOCAL_BUILDERS.get(path.suffix, "text") == "text":
            try:
                return [t for t in text_rows(path) if t and t.strip()]
            except (OSError, UnicodeDecodeError) as exc:
                raise RoseError(f"cannot load data {source!r} ({first_line(exc)})") from None
        raise RoseError(f"reading {source!r} needs the datasets package, which cannot be imported here: pip install "
                        f"datasets, or pass a local .txt file")
    datasets.disable_progress_bars()
    try:
        if is_local(source):
            builder = LOCAL_BUILDERS.get(path.suffix, "text")
            with _quiet_datasets():
                ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        elif source in HUB_SPLITS:
            if not hub_reachable():
                raise RoseError(f"cannot load data {source!r}: the Hugging Face hub is unreachable; offline, pass a "
                                f"local file such as ../shared/data/wikitext2/valid.tokens.txt")
            name, config, calib_split, eval_split = HUB_SPLITS[source]
            which = calib_split if split == "train" else eval_split
            if source == "c4":
                ds = datasets.load_dataset(name, data_files={which: C4_FILES[which]}, split=which)
            else:
                ds = datasets.load_dataset(name, config, split=which)
    except RoseError:
        raise
    except Exception as exc:  # hub unreachable, malformed file, ...
        first = first_line(exc)
        raise RoseError(f"cannot load data {source!r} ({first}); offline, pass a local file such as "
                        f"../shared/data/wikitext2/valid.tokens.txt") from None
    if "text" not in ds.column_names:
        raise RoseError(f"{source} has no 'text' column (columns: {', '.join(ds.column_names)})")
    return [t for t in ds["text"] if t and t.strip()]


def tokenize_stream(tokenizer, rows: list[str]) -> torch.Tensor:
    """Join rows with blank lines and tokenize once, as the SparseGPT/Wanda/ROSE protocol does."""
    return torch.tensor(tokenizer("\n\n".join(rows), add_special_tokens=False)["input_ids"], dtype=torch.long)


def calibration_windows(tokenizer, source: str, nsamples: int, seqlen: int, seed: int,
                        rows: list[str] | None = None) -> torch.Tensor:
    """`nsamples` random windows of `seqlen` tokens, reproducible from `seed` alone (`rows`: the source's text,
    when already read)."""
    if nsamples < 1 or seqlen < 2:
        raise RoseError(f"need --nsamples >= 1 and --seqlen >= 2 (got {nsamples} and {seqlen})")
    rows = load_rows(source, "train") if rows is None else rows
    if not rows:
        raise RoseError(f"calibration source {source} holds no text")
    rng = random.Random(seed)
    if source == "c4":  # C4 as in the papers: a random document long enough, then a window inside it
        out = []
        while len(out) < nsamples:
            ids = tokenize_stream(tokenizer, [rows[rng.randrange(len(rows))]])
            if len(ids) > seqlen:
                i = rng.randint(0, len(ids) - seqlen - 1)
                out.append(ids[i:i + seqlen])
        return torch.stack(out)
    ids = tokenize_stream(tokenizer, rows)
    if len(ids) <= seqlen:
        raise RoseError(f"calibration source {source} has {len(ids)} tokens, too few for --seqlen {seqlen}")
    starts = [rng.randint(0, len(ids) - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[i:i + seqlen] for i in starts])


def evaluation_tokens(tokenizer, source: str, rows: list[str] | None = None) -> torch.Tensor:
    return tokenize_stream(tokenizer, load_rows(source, "test") if rows is None else rows)
