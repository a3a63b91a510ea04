"""Calibration and evaluation text through `datasets`: hub names (`wikitext2`, `c4`) or local files, and `pydoc`,
a text that ships with Python itself.

`pydoc` is the documentation of Python's language and built-ins that `help()` shows: the standard library module
`pydoc_data.topics` (PSF license, shipped with every CPython), its topics joined in sorted order. It is a second
domain (technical English with code and grammar rules) that WikiText calibration never sees, and needs no network
and no download; the text follows the Python release, which every recipe records (`versions.python`).
"""
from __future__ import annotations

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


def load_rows(source: str, split: str = "train") -> list[str]:
    """Text rows of a local file (one row per line for text, the `text` field otherwise), a hub dataset, or a
    built-in source (`pydoc`: one row per topic; it has no splits)."""
    if source == "pydoc" and not Path(source).exists():
        return [t for t in pydoc_rows() if t.strip()]
    import datasets

    datasets.disable_progress_bars()
    path = Path(source)
    try:
        if path.suffix in LOCAL_BUILDERS or path.exists():
            if not path.is_file():
                raise RoseError(f"calibration/evaluation file {source} does not exist")
            builder = LOCAL_BUILDERS.get(path.suffix, "text")
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
        else:
            raise RoseError(f"unknown data source {source!r}: use wikitext2, c4, pydoc, or a .txt/.jsonl/.parquet "
                            f"file")
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


def calibration_windows(tokenizer, source: str, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` random windows of `seqlen` tokens, reproducible from `seed` alone."""
    if nsamples < 1 or seqlen < 2:
        raise RoseError(f"need --nsamples >= 1 and --seqlen >= 2 (got {nsamples} and {seqlen})")
    rows = load_rows(source, "train")
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


def evaluation_tokens(tokenizer, source: str) -> torch.Tensor:
    return tokenize_stream(tokenizer, load_rows(source, "test"))
