"""The backend registry: one small entry per way of running a 2:4 linear layer or a whole model.

An entry says where it runs, whether it is the sparse side of a comparison (and against which dense entry),
why it cannot run on this machine (`available()` returns the reason, or None), and how to build a linear
operator and/or a model runner. Entries live in one module per family (`torch_backends`, `semi_backends`,
`ort_backends`, `rose_backends`), each holding its builders; `backends.py` gathers them. Builders raise
`Unsupported` for a case they do not take (a dtype, a shape); the case is then reported as skipped with that reason.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rose.config import parse_list
from rose.errors import RoseError


class Unsupported(Exception):
    """This backend does not take this case (dtype, shape, missing export format); the message says why."""


@dataclass
class LinearOp:
    """y = x W^T prepared once for one weight: `fn(to_input(x))` is what gets timed."""

    fn: Callable[[Any], Any]
    to_input: Callable[[torch.Tensor], Any]      # fp32 CPU x (already rounded to the dtype) -> what fn takes
    to_output: Callable[[Any], torch.Tensor]     # fn's result -> fp32 tensor (on its device: the gate compares there)
    weight_bytes: int                            # bytes of weights held (and read once per call)
    file_bytes: int | None = None                # serialized size, where the backend has a file format
    cuda: bool = False                           # time with CUDA events
    max_tokens: int | None = None                # more rows of x are not taken (a decode kernel): skipped cases
    info: dict | None = None                     # what the record should also say (the stored form, say)


@dataclass(frozen=True)
class Backend:
    name: str
    device: str                                   # "cpu" or "cuda"
    sparse: bool
    baseline: str | None                          # the dense entry a sparse one is compared with
    available: Callable[[], str | None]
    linear: Callable[[torch.Tensor, torch.dtype, int], LinearOp] | None = None   # (W 2:4 fp32 CPU, dtype, threads)
    model: Callable[[Any, torch.dtype, int], Any] | None = None                  # (ModelSource, dtype, threads)
    description: str = ""


BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    BACKENDS[backend.name] = backend
    return backend


def resolve(names: str | list[str] | None, kind: str) -> list[Backend]:
    """The requested entries (default: all that implement `kind`); an unknown name is a one-line error."""
    if names is None:
        return [b for b in BACKENDS.values() if getattr(b, kind) is not None]
    items = parse_list(names, "--backends", choices=list(BACKENDS), what="backend")
    for n in items:
        if getattr(BACKENDS[n], kind) is None:
            raise RoseError(f"backend {n!r} has no {kind} benchmark: choose from "
                            f"{', '.join(b for b, e in BACKENDS.items() if getattr(e, kind) is not None)}")
    return [BACKENDS[n] for n in items]


def always() -> None:
    return None


def cuda() -> str | None:
    return None if torch.cuda.is_available() else "no CUDA device here (torch.cuda.is_available() is False)"
