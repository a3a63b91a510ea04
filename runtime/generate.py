"""Greedy generation with a static KV cache and CUDA graphs, the same for a dense and a 2:4 model.

    from runtime.generate import GraphedGenerator
    gen = GraphedGenerator(model, max_len=2048 + 64)
    logits = gen.prefill(ids)                 # (batch, prompt, vocab), a buffer reused by the next call
    tokens = gen.generate(ids, steps=32)      # (batch, steps + 1) on the CPU: the first token and the next `steps`

Why: in eager mode every kernel launch costs host time, and a 7B model's decode step launches hundreds (plus
0.4-0.8 ms of plan set-up per cuSPARSELt call in eager PyTorch). Replaying a captured CUDA graph removes all of it,
for dense and sparse alike, so what is left to compare is the GPU work. Chosen over `torch.compile(mode=
"reduce-overhead")` because it needs no compiler (the Triton 2:4 kernel and cuSPARSELt's private operators run as
they are), works the same on transformers 5.17 and 5.24, and fails in one place (capture) that can fall back to
eager.

How:
- One transformers `StaticCache` (keys and values preallocated for `max_len` positions; its tensors keep their
  addresses, which graphs need).
- Prefill: one graph per prompt length (captured on first use, up to `max_graphs`; other lengths run the same code
  eagerly). It rewinds the cache (each layer's position counter set to 0) and runs the model on the prompt with
  no attention mask: transformers' SDPA path then uses `is_causal=True` and crops the keys to the prompt (its own
  "prefill into an empty StaticCache" case), so prefill gets the fused causal attention kernels.
- Decode: one graph per batch size for one step: the model on the last token at position `pos` with a boolean
  mask (key <= pos) over the whole cache; the greedy token is written back into the graph's input, `pos` moves
  on, and the token lands in an output buffer; the host only replays the graph `steps` times, then reads the
  tokens once.
- The model runs with an attention implementation registered here under `ATTENTION` (transformers' own SDPA
  function under another name) while warming up and capturing: transformers then builds no mask itself (its mask
  code reads the cache's position counter on the host in some releases, a synchronisation that capture refuses),
  the prompt needs none, and the decode step brings its own. Batches with padding are not supported.
- Warm-up (two eager runs on a side stream, which also compiles the Triton kernels and runs cuSPARSELt's
  algorithm search) precedes every capture. Each graph has its own memory pool; outputs are buffers owned by the
  graphs, overwritten by the next replay.
- If a capture fails (an operation that synchronises, an allocation the graph cannot own), the generator says why
  once (`graph_error`) and runs the same steps eagerly from then on.

`capture=` takes another capturer: the CPU tests pass `Deferred` (capture stores the function, replay calls it),
which runs every line above but the CUDA graph itself.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable

import torch

from .errors import RoseRuntimeError, first_line

log = logging.getLogger(__name__)

ATTENTION = "rose_graph_sdpa"
WARMUP_RUNS = 2


def cache_kwarg(model) -> str:
    """The keyword that hands a KV cache to `model`'s forward: `cache` from transformers 5.24 on, `past_key_values`
    before (the GPU machine's 5.17)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def register_attention() -> None:
    """transformers' SDPA attention under the name `ATTENTION`, for which transformers builds no mask."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register(ATTENTION, sdpa_attention_forward)


@contextlib.contextmanager
def attention(model, name: str):
    """Run `model` with attention implementation `name` (restored afterwards)."""
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


# ---- capturers -------------------------------------------------------------------------------------------------

class CudaGraphs:
    """torch.cuda.CUDAGraph capture with warm-up on a side stream. Each graph keeps its own memory pool: a shared
    one would let a later graph's intermediates land where an earlier graph's output (the prefill logits) lives."""

    def warmup(self, fn: Callable[[], None], runs: int = WARMUP_RUNS) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(runs):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay


class Deferred:
    """A capturer for machines without CUDA (tests): warm-up runs `fn`, capture stores it, replay calls it. Like a
    real capture, capturing executes nothing; unlike one, replay re-runs the Python too."""

    def __init__(self):
        self.captured = 0

    def warmup(self, fn: Callable[[], None], runs: int = WARMUP_RUNS) -> None:
        for _ in range(runs):
            fn()

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        self.captured += 1
        return fn


# ---- the generator ------------------------------------------------------------------------------------------

class GraphedGenerator:
    """Greedy generation for a transformers causal LM (LLaMA family) with a static cache and CUDA graphs; see the
    module docstring. `max_len`: prompt plus generated tokens, at most (grown, with every graph recaptured, when a
    call needs more)."""

    def __init__(self, model, max_len: int, capture=None, max_graphs: int = 8):
        if max_len < 2:
            raise RoseRuntimeError(f"max_len must be >= 2, got {max_len}")
        self.model = model.eval()
        self.device = next(model.parameters()).device
        if capture is None:
            if self.device.type != "cuda":
                raise RoseRuntimeError(f"CUDA graphs need a model on a CUDA device, and this one is on {self.device}: "
                                       f"pass capture=Deferred() to run the same steps without graphs")
            capture = CudaGraphs()
        self.capturer, self.max_graphs = capture, max_graphs
        self.cache_kw = cache_kwarg(model)
        self.graph_error: str | None = None
        self.captures = 0
        register_attention()
        self._build(max_len)

    # -- state --
    def _build(self, max_len: int) -> None:
        from transformers import StaticCache

        self.max_len = max_len
        self.cache = StaticCache(config=self.model.config, max_cache_len=max_len)
        self.kv_range = torch.arange(max_len, device=self.device)
        self.prefills: dict[tuple[int, int], dict] = {}
        self.decoders: dict[int, dict] = {}

    def _layers(self):
        layers = getattr(self.cache, "layers", None)
        if not layers or not all(hasattr(layer, "cumulative_length") for layer in layers):
            raise RoseRuntimeError("this transformers' StaticCache has no per-layer position counter "
                                   "(cumulative_length): the graphed generator needs transformers 5.x")
        return layers

    def _rewind(self) -> None:
        for layer in self._layers():
            if getattr(layer, "is_initialized", False):
                layer.cumulative_length.zero_()

    def _forward(self, ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.model(input_ids=ids, position_ids=position_ids, attention_mask=mask,
                          **{self.cache_kw: self.cache}, use_cache=True).logits

    def _ensure(self, total: int) -> None:
        if total > self.max_len:   # a longer sequence: a larger cache, every graph captured again
            self._build(max(total, 2 * self.max_len))

    def _graph(self, body: Callable[[], None], what: str) -> Callable[[], None]:
        """Warm up, then capture `body`; on failure, say why once and run it eagerly from then on."""
        with attention(self.model, ATTENTION):
            self.capturer.warmup(body)
            if self.graph_error is None:
                try:
                    replay = self.capturer.capture(body)
                    self.captures += 1
                    return replay
                except Exception as exc:  # noqa: BLE001 - whatever refuses capture: run eagerly, say why
                    self.graph_error = f"{what}: {type(exc).__name__}: {first_line(exc)[:240]}"
                    log.warning("CUDA graph capture failed (%s); running eagerly", self.graph_error)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()
        return lambda: self._eager(body)

    # -- prefill --
    def _prefill_slot(self, batch: int, length: int) -> dict:
        key = (batch, length)
        slot = self.prefills.get(key)
        if slot is not None:
            return slot
        ids = torch.zeros(batch, length, dtype=torch.long, device=self.device)
        positions = torch.arange(length, device=self.device).unsqueeze(0).expand(batch, -1)
        slot = {"ids": ids, "out": None}

        def body():
            self._rewind()
            slot["out"] = self._forward(ids, positions, None)

        if len(self.prefills) >= self.max_graphs:
            slot["run"] = lambda: self._eager(body)
        else:
            slot["run"] = self._graph(body, f"prefill of {length} tokens")
        self.prefills[key] = slot
        return slot

    def _eager(self, body: Callable[[], None]) -> None:
        with attention(self.model, ATTENTION):
            body()

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits of the prompt (batch x length x vocab), the cache filled with its keys and values. The tensor is
        the graph's output buffer: copy it before the next call if it must be kept."""
        ids = ids.to(self.device)
        batch, length = ids.shape
        self._ensure(length + 1)
        slot = self._prefill_slot(batch, length)
        slot["ids"].copy_(ids)
        slot["run"]()
        return slot["out"]

    # -- decode --
    def _decoder(self, batch: int) -> dict:
        slot = self.decoders.get(batch)
        if slot is not None:
            return slot
        dev = self.device
        slot = {"tok": torch.zeros(batch, 1, dtype=torch.long, device=dev),
                "pos": torch.zeros(1, dtype=torch.long, device=dev),
                "step": torch.zeros(1, dtype=torch.long, device=dev),
                "out": torch.zeros(batch, self.max_len, dtype=torch.long, device=dev)}
        tok, pos, step, out = slot["tok"], slot["pos"], slot["step"], slot["out"]

        def body():
            mask = (self.kv_range <= pos).view(1, 1, 1, -1)                # keys up to and including pos
            logits = self._forward(tok, pos.view(1, 1).expand(batch, 1), mask)
            nxt = logits[:, -1].argmax(-1).view(batch, 1)
            tok.copy_(nxt)
            out.index_copy_(1, step, nxt)
            step.add_(1)
            pos.add_(1)

        # the cache must exist (lazily allocated by the first update) and hold a prompt before the warm-up
        if not all(getattr(layer, "is_initialized", False) for layer in self._layers()):
            raise RoseRuntimeError("prefill once before decoding: the static cache is allocated by the first prompt")
        saved = [layer.cumulative_length.clone() for layer in self._layers()]
        pos.fill_(int(saved[0]))
        slot["run"] = self._graph(body, f"decode step (batch {batch})")
        for layer, value in zip(self._layers(), saved):    # the warm-up ran steps: back to where the prompt ended
            layer.cumulative_length.copy_(value)
        self.decoders[batch] = slot
        return slot

    @torch.no_grad()
    def start(self, ids: torch.Tensor) -> torch.Tensor:
        """Prefill `ids` and pick the first token greedily; returns it (batch x 1, on the device) and readies the
        decode step at the position after the prompt."""
        logits = self.prefill(ids)
        first = logits[:, -1].argmax(-1).view(ids.shape[0], 1)
        self._ready = (ids.shape[0], ids.shape[1], first)
        return first

    @torch.no_grad()
    def decode(self, steps: int) -> torch.Tensor:
        """`steps` greedy tokens after `start`: (batch x steps+1) on the CPU, the first token included."""
        if not getattr(self, "_ready", None):
            raise RoseRuntimeError("call start(ids) before decode(steps)")
        batch, length, first = self._ready
        self._ready = None
        if length + steps + 1 > self.max_len:
            raise RoseRuntimeError(f"{length} prompt tokens and {steps} more exceed the cache of {self.max_len}: "
                                   f"build the generator with a larger max_len")
        slot = self._decoder(batch)
        slot["tok"].copy_(first)
        slot["pos"].fill_(length)
        slot["step"].zero_()
        for layer in self._layers():
            layer.cumulative_length.fill_(length)
        for _ in range(steps):
            slot["run"]()
        return torch.cat([first, slot["out"][:, :steps]], dim=1).cpu()

    def generate(self, ids: torch.Tensor, steps: int) -> torch.Tensor:
        self._ensure(ids.shape[1] + steps + 1)
        self.start(ids)
        return self.decode(steps)
