"""The torch family: PyTorch dense on the CPU and on CUDA (the baselines), and the model runner that every
PyTorch-based backend (semi-structured, rose's C++ kernel) shares."""
from __future__ import annotations

from collections.abc import Callable

import torch

from .registry import Backend, LinearOp, Unsupported, always, cuda, register


def sparse_bytes(t: torch.Tensor) -> int:
    """Bytes a (possibly SparseSemiStructuredTensor) weight holds: kept values and metadata."""
    parts = [getattr(t, a, None) for a in ("packed", "meta", "packed_t", "meta_t", "compressed_swizzled_bitmask")]
    parts = [p for p in parts if isinstance(p, torch.Tensor)]
    return sum(p.nbytes for p in parts) if parts else t.nbytes


def _packed_bytes(module: torch.nn.Module) -> int | None:
    """Weight bytes of one of rose's packed modules (C++, Triton or GPU 2:4 layers), None for anything else."""
    held = getattr(module, "weight_bytes", None)
    if isinstance(held, int):  # they count their bias there; it is counted once, with the parameters
        bias = getattr(module, "bias", None)
        return held - (bias.nbytes if isinstance(bias, torch.Tensor) else 0)
    return None


def model_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every weight the model holds: parameters (SparseSemiStructuredTensors by their packed parts) and
    the buffers of rose's packed modules."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += sparse_bytes(p.data if not hasattr(p, "packed") else p)
    for m in model.modules():
        held = _packed_bytes(m)
        if held is not None:
            total += held
    return total


def linear_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the prunable linears' weights (packed or dense), the part that 2:4 shrinks."""
    from rose.arch import all_sublayers

    total = 0
    for m in all_sublayers(model).values():
        held = _packed_bytes(m)
        total += held if held is not None else sparse_bytes(m.weight)
    return total


def _dense_linear(device: str) -> Callable[[torch.Tensor, torch.dtype, int], LinearOp]:
    def build(W: torch.Tensor, dtype: torch.dtype, threads: int) -> LinearOp:
        if device == "cpu" and dtype != torch.float32 and not _cpu_half_ok(dtype):
            raise Unsupported(f"torch on this CPU has no {dtype} matmul")
        Wd = W.to(device=device, dtype=dtype).contiguous()
        return LinearOp(fn=lambda x: torch.nn.functional.linear(x, Wd),
                        to_input=lambda x: x.to(device=device, dtype=dtype),
                        to_output=lambda y: y.float(), weight_bytes=Wd.nbytes, cuda=device == "cuda")
    return build


def _cpu_half_ok(dtype: torch.dtype) -> bool:
    try:
        torch.nn.functional.linear(torch.ones(2, 8, dtype=dtype), torch.ones(4, 8, dtype=dtype))
        return True
    except RuntimeError:
        return False


class TorchRunner:
    """A transformers model behind the runner interface of `model_bench` (logits, prefill, first_token, start,
    decode), greedy with a DynamicCache, eagerly."""

    graphs = False

    def __init__(self, model: torch.nn.Module, device: str, info: dict | None = None):
        self.model, self.device, self.cuda = model.eval(), device, device == "cuda"
        self.weight_bytes, self.file_bytes = model_weight_bytes(model), None
        self.linear_bytes = linear_weight_bytes(model)
        self.info = dict(info or {})
        from rose.models import cache_kwarg

        self.cache_kw = cache_kwarg(model)

    @torch.no_grad()
    def _forward(self, ids: torch.Tensor, cache):
        return self.model(input_ids=ids, **{self.cache_kw: cache}, use_cache=True).logits

    def _cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self._forward(ids.to(self.device), self._cache()).float().cpu()

    def prefill(self, ids: torch.Tensor):
        return self._forward(ids.to(self.device), self._cache())

    def start(self, ids: torch.Tensor):
        cache = self._cache()
        logits = self._forward(ids.to(self.device), cache)
        return cache, logits[:, -1:].argmax(-1)

    def first_token(self, ids: torch.Tensor):
        return self.start(ids)[1].cpu()

    def decode(self, state, steps: int) -> torch.Tensor:
        """Greedy decoding; returns the first token and the `steps` that follow (batch x steps+1)."""
        cache, token = state
        tokens = [token]
        for _ in range(steps):
            token = self._forward(token, cache)[:, -1:].argmax(-1)
            tokens.append(token)
        return torch.cat(tokens, dim=1).cpu()

    def prime(self, ids: torch.Tensor, steps: int) -> None:
        """Anything a runner builds on first use for this case (graphs), done before timing; nothing here."""

    def eager(self) -> "TorchRunner":
        return self


CAPTURE = None   # the capturer graphed runners use (None: CUDA graphs); tests set runtime.generate.Deferred


class GraphedRunner(TorchRunner):
    """The same model through `runtime.generate.GraphedGenerator`: a static KV cache, prefill and decode steps
    replayed as CUDA graphs (falling back to eager, with the reason in `graph_error`, where capture fails)."""

    graphs = True

    def __init__(self, base: TorchRunner, max_len: int, capture=None):
        from runtime.generate import GraphedGenerator

        self.__dict__.update(base.__dict__)
        self.base = base
        self.gen = GraphedGenerator(base.model, max_len, capture=capture or CAPTURE)

    @property
    def graph_error(self) -> str | None:
        return self.gen.graph_error

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.gen.prefill(ids).float().cpu()

    def prefill(self, ids: torch.Tensor):
        return self.gen.prefill(ids)

    def start(self, ids: torch.Tensor):
        return self.gen.start(ids)

    def first_token(self, ids: torch.Tensor):
        return self.gen.start(ids).cpu()

    def decode(self, state, steps: int) -> torch.Tensor:
        return self.gen.decode(steps)

    def prime(self, ids: torch.Tensor, steps: int) -> None:
        self.decode(self.start(ids), steps)   # captures the prefill graph of this length (and the decode step)

    def eager(self) -> TorchRunner:
        return self.base


def _model(device: str):
    def build(source, dtype: torch.dtype, threads: int) -> TorchRunner:
        return TorchRunner(source.model(device, dtype), device)
    return build


register(Backend("torch-cpu", "cpu", False, None, always, _dense_linear("cpu"), _model("cpu"),
                 "PyTorch dense matmul on the CPU (zeros stored)"))
register(Backend("torch-cuda", "cuda", False, None, cuda, _dense_linear("cuda"), _model("cuda"),
                 "PyTorch dense matmul on CUDA (cuBLAS)"))
