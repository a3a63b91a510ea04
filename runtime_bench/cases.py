"""The two benchmarks. Both gate every backend for correctness first, then time the ones that pass interleaved,
on the same inputs, in one process, and return a JSON-ready dict (records + environment + skipped backends).

linear: y = x W^T for an exact 2:4 W (random, magnitude-masked) against the dense reference x @ (W*mask)^T.
model:  prefill, time to first token and greedy decoding with the KV cache, logits gated against the dense fp32
        model of the same weights.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rose.errors import RoseError

from .backends import Backend, Unsupported
from .memory import cuda_peak, peak_rss
from .presets import Shape, hf_config
from .report import environment, stamp
from .timing import Timed, copy_bandwidth, interleaved

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LINEAR_TOL = {"fp32": 1e-5, "fp16": 1e-2, "bf16": 1e-2}   # relative L2 error of y
MODEL_TOL = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}    # relative L2 error of the logits (errors compound)
GATE_TOKENS = 8  # prompt length of the end-to-end correctness gate
GREEDY_STEPS = 16  # greedy tokens compared with the dense model (recorded, not gated: low precision may differ)


@dataclass(frozen=True)
class Settings:
    warmup: int = 3
    iters: int = 20
    threads: int = 1
    seed: int = 0
    rss: bool = True  # CPU backends: peak RSS of a fresh subprocess


def parse_counts(text: str, what: str) -> list[int]:
    """`1,8,64` -> [1, 8, 64]; anything below 1 or not an integer is a one-line error."""
    out = []
    for item in (s.strip() for s in str(text).split(",")):
        if not item:
            continue
        try:
            value = int(item)
        except ValueError:
            raise RoseError(f"{what} must be integers >= 1, got {item!r}") from None
        if value < 1:
            raise RoseError(f"{what} must be integers >= 1, got {value}")
        out.append(value)
    if not out:
        raise RoseError(f"{what} is empty")
    return list(dict.fromkeys(out))


def parse_dtypes(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [n for n in names if n not in DTYPES]
    if bad or not names:
        raise RoseError(f"unknown dtype {bad[0] if bad else text!r}: choose from {', '.join(DTYPES)}")
    return list(dict.fromkeys(names))


def linear_weight(shape: Shape, seed: int) -> torch.Tensor:
    """A random fp32 weight made exactly 2:4 by magnitude (2 zeros in every 4 inputs)."""
    from rose.masks import nm_mask

    if shape[1] % 4:
        raise RoseError(f"shape {shape[0]}x{shape[1]}: the input width must be a multiple of 4 for 2:4")
    W = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) / math.sqrt(shape[1])
    return W.masked_fill(nm_mask(W.abs(), 2, 4), 0.0)


def linear_input(tokens: int, cols: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """fp32 values already rounded to `dtype`, so every backend and the reference see the same numbers."""
    return torch.randn(tokens, cols, generator=torch.Generator().manual_seed(seed + 1)).to(dtype).float()


def prompt_ids(batch: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(vocab, (batch, length), generator=torch.Generator().manual_seed(seed + 2))


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.double().cpu(), ref.double().cpu()
    if y.shape != ref.shape:
        return math.inf
    err = float((y - ref).norm() / ref.norm().clamp_min(1e-30))
    return err if math.isfinite(err) else math.inf


def split_available(backends: list[Backend]) -> tuple[list[Backend], dict[str, str]]:
    usable, skipped = [], {}
    for b in backends:
        reason = b.available()
        if reason:
            skipped[b.name] = reason
        else:
            usable.append(b)
    return usable, skipped


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > 200:  # onnxruntime prefixes the C++ source location: keep the end, where the reason is
        first = "..." + first[-200:]
    return f"{type(exc).__name__}: {first}"


def _record(b: Backend, env: dict, base: dict, status: str, **extra) -> dict[str, Any]:
    return {**base, "backend": b.name, "device": b.device, "sparse": b.sparse, "baseline": b.baseline,
            "status": status, **extra, **stamp(env, b.device)}


def _document(kind: str, backends: list[Backend], skipped: dict, env: dict, settings: Settings, records: list,
              **extra) -> dict[str, Any]:
    info = {b.name: {"device": b.device, "sparse": b.sparse, "baseline": b.baseline, "description": b.description,
                     "available": b.name not in skipped, **({"reason": skipped[b.name]} if b.name in skipped else {})}
            for b in backends}
    return {"version": 1, "benchmark": kind, "settings": settings.__dict__, "environment": env, "backends": info,
            "skipped": skipped, **extra, "records": records}


def _bandwidths(usable: list[Backend]) -> dict[str, float]:
    devices = sorted({b.device for b in usable} | {"cpu"})
    return {d: copy_bandwidth(d) for d in devices}


def add_ratios(records: list[dict], keys: tuple[str, ...], metrics: dict[str, bool]) -> None:
    """`<metric>_ratio` on each sparse record: dense/sparse for times (lower_is_better) and sparse/dense for rates,
    so > 1 always means the sparse backend wins."""
    index = {(r["backend"], *(json.dumps(r.get(k)) for k in keys)): r for r in records if r["status"] == "ok"}
    for r in records:
        base = index.get((r["baseline"], *(json.dumps(r.get(k)) for k in keys))) if r["baseline"] else None
        if r["status"] != "ok" or base is None:
            continue
        for metric, lower_is_better in metrics.items():
            if r.get(metric) and base.get(metric):
                r[f"{metric}_ratio"] = base[metric] / r[metric] if lower_is_better else r[metric] / base[metric]


# ---- linear ---------------------------------------------------------------------------------------------------

def run_linear(shapes: dict[Shape, list[str]], tokens: list[int], dtypes: list[str], backends: list[Backend],
               settings: Settings, label: str) -> dict[str, Any]:
    usable, skipped = split_available(backends)
    env = environment(settings.threads, copy=_bandwidths(usable))
    records: list[dict[str, Any]] = []
    ref_device = "cuda" if any(b.device == "cuda" for b in usable) else "cpu"
    for shape, layers in shapes.items():
        W = linear_weight(shape, settings.seed)
        for dname in dtypes:
            dtype, tol = DTYPES[dname], LINEAR_TOL[dname]
            base = {"case": "linear", "model": label, "shape": list(shape), "layers": layers, "dtype": dname,
                    "batch": 1}
            ops = {}
            for b in usable:
                try:
                    ops[b.name] = (b, b.linear(W, dtype, settings.threads))
                except Unsupported as exc:
                    records += [_record(b, env, {**base, "tokens": t}, "skipped", reason=str(exc)) for t in tokens]
                except Exception as exc:  # a backend that breaks is reported, never fatal
                    records += [_record(b, env, {**base, "tokens": t}, "error", message=_one_line(exc))
                                for t in tokens]
            Wr = W.to(dtype).float().to(ref_device)
            for t in tokens:
                records += _linear_case(ops, env, {**base, "tokens": t}, W, Wr, dtype, tol, settings)
            if settings.rss:
                _attach_rss(records, ops, base, dname, max(tokens), settings)
    add_ratios(records, ("shape", "dtype", "tokens"), {"median_ms": True})
    return _document("linear", backends, skipped, env, settings, records, source=label)


def _linear_case(ops: dict, env: dict, base: dict, W: torch.Tensor, Wr: torch.Tensor, dtype: torch.dtype,
                 tol: float, settings: Settings) -> list[dict[str, Any]]:
    x = linear_input(base["tokens"], W.shape[1], settings.seed, dtype)
    ref = (x.to(Wr.device) @ Wr.T).cpu()
    out, contenders = {}, {}
    for name, (b, op) in ops.items():
        extra = {"weight_bytes": op.weight_bytes, "tolerance": tol,
                 **({"weight_file_bytes": op.file_bytes} if op.file_bytes is not None else {})}
        try:
            xi = op.to_input(x)
            err = rel_error(op.to_output(op.fn(xi)), ref)
        except Exception as exc:
            out[name] = _record(b, env, base, "error", message=_one_line(exc), **extra)
            continue
        if err > tol:
            out[name] = _record(b, env, base, "wrong", error=err, **extra)
            continue
        out[name] = _record(b, env, base, "ok", error=err, **extra)
        contenders[name] = Timed(run=lambda _, f=op.fn, a=xi: f(a), cuda=op.cuda)
    for name, stats in interleaved(contenders, settings.warmup, settings.iters).items():
        r, (b, op) = out[name], ops[name]
        r.update(stats)
        if op.cuda:
            r.update(cuda_peak(lambda c=contenders[name]: c.run(None)))
        if base["tokens"] == 1:
            r["weight_gbs"] = op.weight_bytes / (stats["median_ms"] / 1e3) / 1e9
            r["copy_gbs"] = env["copy_gbs"][b.device] / 1e9
    return list(out.values())


def _attach_rss(records: list, ops: dict, base: dict, dname: str, tokens: int, settings: Settings) -> None:
    for name, (b, _) in ops.items():
        if b.device != "cpu":
            continue
        spec = {"kind": "linear", "backend": name, "shape": base["shape"], "dtype": dname, "tokens": tokens,
                "seed": settings.seed, "threads": settings.threads}
        rss = {**peak_rss(spec), "rss_tokens": tokens}
        for r in records:
            if r["backend"] == name and r["shape"] == base["shape"] and r["dtype"] == dname and r["status"] == "ok":
                r.update(rss)


# ---- model ----------------------------------------------------------------------------------------------------

@dataclass
class ModelSource:
    """Where the weights come from: a pruned / prune-and-export directory, or a preset with random 2:4 weights."""

    label: str
    hf: Path | None = None           # dense Hugging Face directory (zeros kept)
    export: Path | None = None       # prune-and-export output (onnx/, onnx-packed24/, semi-structured/, ...)
    manifest: dict = field(default_factory=dict)
    preset: str | None = None
    layers: int | None = None
    seed: int = 0
    _dense: Any = None

    @classmethod
    def pruned(cls, path: Path) -> "ModelSource":
        path = Path(path).expanduser()
        if not path.exists():
            raise RoseError(f"pruned directory {path} does not exist: pass the --out of `rose-export "
                            f"prune-and-export` (or of `rose-export prune`)")
        if (path / "manifest.json").is_file():
            from export.manifest import load

            hf = path / "hf" if (path / "hf" / "config.json").is_file() else None
            if hf is None:
                raise RoseError(f"{path} has no hf/ export: the dense reference needs it; export with hf in --formats")
            return cls(label=str(path), hf=hf, export=path, manifest=load(path))
        if (path / "config.json").is_file():
            return cls(label=str(path), hf=path)
        raise RoseError(f"{path} is neither a prune-and-export output (no manifest.json) nor a pruned model "
                        f"(no config.json)")

    @classmethod
    def random(cls, preset: str, layers: int | None, seed: int) -> "ModelSource":
        hf_config(preset, layers)  # validates the name now
        return cls(label=f"{preset} (random 2:4{f', {layers} layers' if layers else ''})", preset=preset,
                   layers=layers, seed=seed)

    def spec(self) -> dict[str, Any]:
        return {"pruned": str(self.export or self.hf) if self.preset is None else None, "preset": self.preset,
                "layers": self.layers, "seed": self.seed}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "ModelSource":
        return cls.pruned(Path(spec["pruned"])) if spec["pruned"] else cls.random(spec["preset"], spec["layers"],
                                                                                  spec["seed"])

    @property
    def vocab(self) -> int:
        from transformers import AutoConfig

        return (hf_config(self.preset, self.layers) if self.preset else AutoConfig.from_pretrained(self.hf)).vocab_size

    def dense_fp32(self):
        """The dense fp32 CPU model (zeros in place): the reference of the correctness gate. Built once."""
        if self._dense is None:
            from transformers import AutoModelForCausalLM

            _quiet_transformers()

            if self.preset is None:
                self._dense = AutoModelForCausalLM.from_pretrained(self.hf, dtype=torch.float32).eval()
            else:
                self._dense = _random_24(self.preset, self.layers, self.seed)
        return self._dense

    def model(self, device: str, dtype: torch.dtype):
        """The dense model on `device` in `dtype`, loaded directly in that dtype where possible."""
        from transformers import AutoModelForCausalLM

        from .runners import clone

        if (device, dtype) == ("cpu", torch.float32) or self.preset is not None:
            return clone(self.dense_fp32(), device, dtype)
        _quiet_transformers()
        return AutoModelForCausalLM.from_pretrained(self.hf, dtype=dtype).to(device).eval()

    def release(self) -> None:
        self._dense = None

    def formats_bytes(self) -> dict[str, int]:
        return {f: info["bytes"] for f, info in self.manifest.get("formats", {}).items()}


def _quiet_transformers() -> None:
    """Loading bars would interleave with the benchmark's own output."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _random_24(preset: str, layers: int | None, seed: int):
    from transformers import AutoModelForCausalLM

    from rose.arch import all_sublayers
    from rose.masks import nm_mask

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(preset, layers), dtype=torch.float32).eval()
    with torch.no_grad():
        for module in all_sublayers(model).values():
            module.weight.masked_fill_(nm_mask(module.weight.abs(), 2, 4), 0.0)
    return model


def run_model(source: ModelSource, prompt_lens: list[int], batches: list[int], decode_tokens: int,
              dtypes: list[str], backends: list[Backend], settings: Settings) -> dict[str, Any]:
    from .runners import TorchRunner

    usable, skipped = split_available(backends)
    env = environment(settings.threads, copy=_bandwidths(usable))
    gate_ids = prompt_ids(1, GATE_TOKENS, source.vocab, settings.seed)
    dense = TorchRunner(source.dense_fp32(), "cpu")
    reference = dense.logits(gate_ids)
    greedy_ref = dense.decode(dense.start(gate_ids), GREEDY_STEPS)
    grid = [(b, p) for b in batches for p in prompt_lens]
    records: list[dict[str, Any]] = []
    for dname in dtypes:
        dtype, tol = DTYPES[dname], MODEL_TOL[dname]
        base = {"case": "model", "model": source.label, "dtype": dname, "decode_tokens": decode_tokens,
                "tolerance": tol}
        runners, gated = {}, {}
        for b in usable:
            try:
                runner = b.model(source, dtype, settings.threads)
                err = rel_error(runner.logits(gate_ids), reference)
                same = bool(torch.equal(runner.decode(runner.start(gate_ids), GREEDY_STEPS).cpu(), greedy_ref))
            except Unsupported as exc:
                records += [_record(b, env, {**base, "batch": n, "tokens": p}, "skipped", reason=str(exc))
                            for n, p in grid]
                continue
            except Exception as exc:
                records += [_record(b, env, {**base, "batch": n, "tokens": p}, "error", message=_one_line(exc))
                            for n, p in grid]
                continue
            gated[b.name] = (err, same)
            if err > tol:
                records += [_record(b, env, {**base, "batch": n, "tokens": p}, "wrong", error=err) for n, p in grid]
            else:
                runners[b.name] = (b, runner)
        for n, p in grid:
            records += _model_case(runners, gated, env, {**base, "batch": n, "tokens": p}, source, settings)
        if settings.rss:
            _attach_model_rss(records, runners, source, dname, max(batches), max(prompt_lens), decode_tokens,
                              settings)
        del runners
    add_ratios(records, ("dtype", "batch", "tokens"),
               {"prefill_ms": True, "ttft_ms": True, "decode_tokens_per_s": False})
    return _document("model", backends, skipped, env, settings, records, source=source.label,
                     formats_bytes=source.formats_bytes())


def _model_case(runners: dict, gated: dict, env: dict, base: dict, source: ModelSource, settings: Settings
                ) -> list[dict[str, Any]]:
    ids = prompt_ids(base["batch"], base["tokens"], source.vocab, settings.seed)
    steps = base["decode_tokens"]
    sets = {
        "prefill": {n: Timed(run=lambda _, r=r: r.prefill(ids), cuda=r.cuda) for n, (_, r) in runners.items()},
        "ttft": {n: Timed(run=lambda _, r=r: r.first_token(ids), cuda=r.cuda) for n, (_, r) in runners.items()},
        "decode": {n: Timed(setup=lambda r=r: r.start(ids), run=lambda s, r=r: r.decode(s, steps), cuda=r.cuda)
                   for n, (_, r) in runners.items()},
    }
    out = {n: _record(b, env, base, "ok", error=gated[n][0], greedy_same_as_dense=gated[n][1],
                      weight_bytes=r.weight_bytes,
                      **({"linear_weight_bytes": r.linear_bytes} if getattr(r, "linear_bytes", None) else {}),
                      **({"weight_file_bytes": r.file_bytes} if r.file_bytes else {}))
           for n, (b, r) in runners.items()}
    for metric, contenders in sets.items():
        for name, stats in interleaved(contenders, settings.warmup, settings.iters).items():
            out[name].update({f"{metric}_ms": stats["median_ms"], f"{metric}_iqr_ms": stats["iqr_ms"],
                              f"{metric}_times_ms": stats["times_ms"]})
            if metric == "prefill":
                out[name].update({"median_ms": stats["median_ms"], "iqr_ms": stats["iqr_ms"], "runs": stats["runs"]})
    for name, (b, r) in runners.items():
        rec = out[name]
        rec["decode_tokens_per_s"] = base["batch"] * steps / (rec["decode_ms"] / 1e3)
        if r.cuda:
            rec.update(cuda_peak(lambda r=r: r.decode(r.start(ids), steps)))
    return list(out.values())


def _attach_model_rss(records: list, runners: dict, source: ModelSource, dname: str, batch: int, prompt: int,
                      steps: int, settings: Settings) -> None:
    for name, (b, _) in runners.items():
        if b.device != "cpu":
            continue
        spec = {"kind": "model", "backend": name, "source": source.spec(), "dtype": dname, "batch": batch,
                "prompt_len": prompt, "decode_tokens": steps, "seed": settings.seed, "threads": settings.threads}
        rss = {**peak_rss(spec), "rss_batch": batch, "rss_tokens": prompt}
        for r in records:
            if r["backend"] == name and r["dtype"] == dname and r["status"] == "ok":
                r.update(rss)
