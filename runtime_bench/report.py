"""Reports: the environment stamp, results.json, results.md (tables with dense/sparse ratios) and PNG plots
(speedup against token count per shape; latency bars per backend), drawn with matplotlib's Agg canvas."""
from __future__ import annotations

import json
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

RESULTS_JSON, RESULTS_MD = "results.json", "results.md"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor() or platform.machine()


def _driver() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
        return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):  # pragma: no cover
        return None


def environment(threads: int, copy: dict[str, float] | None = None) -> dict[str, Any]:
    """Everything a timing depends on, measured once per run."""
    try:
        import onnxruntime as ort
        ort_version = ort.__version__
    except ImportError:
        ort_version = None
    cuda = torch.cuda.is_available()
    return {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "threads": threads,
            "torch_threads": torch.get_num_threads(), "cpu_model": _cpu_model(), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": ort_version, "cuda": torch.version.cuda,
            "cuda_available": cuda, "gpu": torch.cuda.get_device_name() if cuda else None,
            "driver": _driver() if cuda else None,
            "cusparselt": torch.backends.cusparselt.version() if cuda and torch.backends.cusparselt.is_available()
            else None, "copy_gbs": {d: v for d, v in (copy or {}).items()}}


def stamp(env: dict[str, Any], device: str) -> dict[str, Any]:
    """The fields stamped into every record."""
    return {"device_name": env["gpu"] if device == "cuda" else env["cpu_model"], "threads": env["threads"],
            "torch": env["torch"], "onnxruntime": env["onnxruntime"], "cuda": env["cuda"], "driver": env["driver"],
            "cusparselt": env.get("cusparselt"), "cpu_model": env["cpu_model"]}


def write(out: Path, results: dict[str, Any]) -> list[Path]:
    """Write results.json, results.md and the plots into `out`; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_JSON).write_text(json.dumps(results, indent=2) + "\n")
    md = linear_markdown(results) if results["benchmark"] == "linear" else model_markdown(results)
    (out / RESULTS_MD).write_text(md)
    plots = linear_plots(results, out) if results["benchmark"] == "linear" else model_plots(results, out)
    return [out / RESULTS_JSON, out / RESULTS_MD, *plots]


# ---- markdown -------------------------------------------------------------------------------------------------

def _f(value: Any, fmt: str = ".3f") -> str:
    return "" if value is None else format(value, fmt)


def _mb(value: Any) -> str:
    return "" if value is None else f"{value / 1e6:.2f}"


def _status(r: dict) -> str:
    return {"ok": "ok", "wrong": "**wrong**", "error": f"error: {r.get('message', '')}",
            "skipped": f"skipped: {r.get('reason', '')}"}[r["status"]]


def _header(results: dict, title: str) -> list[str]:
    env = results["environment"]
    lines = [f"# {title}", "", f"Source: {results['source']}", "",
             f"- CPU: {env['cpu_model']}, {env['threads']} threads; GPU: {env['gpu'] or 'none'}"
             f" (driver {env['driver'] or '-'}, CUDA {env['cuda'] or '-'}, cuSPARSELt {env['cusparselt'] or '-'})",
             f"- torch {env['torch']}, onnxruntime {env['onnxruntime'] or '-'}, Python {env['python']}",
             "- copy bandwidth (read + write): " + ", ".join(f"{d} {v / 1e9:.1f} GB/s" for d, v in
                                                              env["copy_gbs"].items()),
             f"- {results['settings']['warmup']} warm-up runs, then {results['settings']['iters']} timed runs per "
             f"case, interleaved across backends; median and IQR; {env['created']}", ""]
    if results["skipped"]:
        lines += ["Skipped backends:", ""] + [f"- `{b}`: {why}" for b, why in results["skipped"].items()] + [""]
    return lines


def linear_markdown(results: dict) -> str:
    lines = _header(results, "2:4 linear layer benchmark (y = x W^T)")
    groups: dict[tuple, list[dict]] = {}
    for r in results["records"]:
        groups.setdefault((r["dtype"], tuple(r["shape"])), []).append(r)
    for (dtype, shape), recs in groups.items():
        lines += [f"## {shape[0]}x{shape[1]} ({', '.join(recs[0]['layers'])}), {dtype}", "",
                  "| tokens | backend | median ms | IQR ms | dense/sparse | rel. error | weights MB | weight GB/s "
                  "| peak RSS MB | status |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in sorted(recs, key=lambda r: (r["tokens"], r["backend"])):
            ratio = _f(r.get("median_ms_ratio"), ".2f") + (f" vs {r['baseline']}" if "median_ms_ratio" in r else "")
            bw = f"{r['weight_gbs']:.1f} (copy {r['copy_gbs']:.1f})" if "weight_gbs" in r else ""
            name = r["backend"] + (" (graph)" if r.get("timing") == "cuda graph" else "")
            lines.append(f"| {r['tokens']} | {name} | {_f(r.get('median_ms'), '.4f')} | "
                         f"{_f(r.get('iqr_ms'), '.4f')} | {ratio} | {_f(r.get('error'), '.1e')} | "
                         f"{_mb(r.get('weight_bytes'))} | {bw} | {_mb(r.get('peak_rss_bytes'))} | {_status(r)} |")
        lines.append("")
    return "\n".join(lines)


def _yes(flag) -> str:
    return "" if flag is None else ("yes" if flag else "no")


def _variant(r: dict) -> str:
    """The backend, and on CUDA whether it ran as CUDA graphs; a graph capture that failed is marked."""
    graphs = r.get("cuda_graphs")
    tag = "" if graphs is None else (" (graphs)" if graphs and not r.get("graph_error") else
                                     " (graphs failed: eager)" if graphs else " (eager)")
    return r["backend"] + tag


def model_markdown(results: dict) -> str:
    lines = _header(results, "End-to-end benchmark: prefill, time to first token, decode with KV cache")
    if results.get("formats_bytes"):
        lines += ["Export sizes: " + ", ".join(f"{f} {b / 1e6:.2f} MB" for f, b in results["formats_bytes"].items()),
                  ""]
    lines += ["| dtype | batch | prompt | backend | prefill ms (IQR) | TTFT ms | decode tok/s | prefill dense/sparse "
              "| decode sparse/dense | linear weights MB | peak mem MB | rel. error | greedy = dense | status |",
              "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in sorted(results["records"], key=lambda r: (r["dtype"], r["batch"], r["tokens"], r["backend"],
                                                       r.get("cuda_graphs") is False)):
        mem = r.get("cuda_peak_bytes", r.get("peak_rss_bytes"))
        iqr = f" ({r['prefill_iqr_ms']:.3f})" if "prefill_iqr_ms" in r else ""
        lines.append(f"| {r['dtype']} | {r['batch']} | {r['tokens']} | {_variant(r)} | "
                     f"{_f(r.get('prefill_ms'))}{iqr} | "
                     f"{_f(r.get('ttft_ms'))} | {_f(r.get('decode_tokens_per_s'), '.1f')} | "
                     f"{_f(r.get('prefill_ms_ratio'), '.2f')} | {_f(r.get('decode_tokens_per_s_ratio'), '.2f')} | "
                     f"{_mb(r.get('linear_weight_bytes'))} | {_mb(mem)} | {_f(r.get('error'), '.1e')} | "
                     f"{_yes(r.get('greedy_same_as_dense'))} | {_status(r)} |")
    lines += ["", f"Decode: {results['records'][0]['decode_tokens'] if results['records'] else 0} greedy tokens per "
              f"sequence after an untimed prefill; tokens/s counts every sequence of the batch. Peak memory: CUDA "
              f"max allocated on GPU backends, peak RSS of a fresh subprocess on CPU backends. (graphs): CUDA-graph "
              f"replay with a static KV cache (runtime/generate.py); (eager): the same weights, eager, DynamicCache.",
              ""]
    errors = {_variant(r): r["graph_error"] for r in results["records"] if r.get("graph_error")}
    if errors:
        lines += ["Graph capture failures (these ran eagerly):", ""] + [f"- {k}: {v}" for k, v in errors.items()] + [""]
    return "\n".join(lines)


# ---- plots ----------------------------------------------------------------------------------------------------

def _figure(width: float = 7, height: float = 4.5):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def linear_plots(results: dict, out: Path) -> list[Path]:
    ok = [r for r in results["records"] if r["status"] == "ok"]
    files = []
    for shape in dict.fromkeys(tuple(r["shape"]) for r in ok):
        lines: dict[str, list[tuple[int, float]]] = {}
        for r in ok:
            if tuple(r["shape"]) == shape and "median_ms_ratio" in r:
                lines.setdefault(f"{r['backend']} / {r['baseline']} ({r['dtype']})", []).append(
                    (r["tokens"], r["median_ms_ratio"]))
        if not lines:
            continue
        fig = _figure()
        ax = fig.add_subplot()
        for label, points in lines.items():
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=label)
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="tokens", ylabel="speedup (dense time / sparse time)", title=f"2:4 linear {shape[0]}x{shape[1]}")
        ax.legend(fontsize=8)
        files.append(out / f"speedup_{shape[0]}x{shape[1]}.png")
        fig.savefig(files[-1], dpi=100)
    for dtype in dict.fromkeys(r["dtype"] for r in ok):
        recs = [r for r in ok if r["dtype"] == dtype]
        tokens = max(r["tokens"] for r in recs)
        groups = [f"{r['shape'][0]}x{r['shape'][1]}" for r in recs if r["tokens"] == tokens]
        files.append(_bars(out / f"latency_{dtype}.png", [r for r in recs if r["tokens"] == tokens],
                           lambda r: f"{r['shape'][0]}x{r['shape'][1]}", list(dict.fromkeys(groups)),
                           f"linear latency at {tokens} tokens, {dtype}"))
    return files


def model_plots(results: dict, out: Path) -> list[Path]:
    ok = [{**r, "backend": _variant(r)} for r in results["records"] if r["status"] == "ok"]
    if not ok:
        return []
    key = lambda r: f"{r['dtype']} b{r['batch']} p{r['tokens']}"  # noqa: E731
    return [_bars(out / "latency_prefill.png", ok, key, list(dict.fromkeys(map(key, ok))), "prefill latency",
                  metric="prefill_ms", ylabel="ms (median)"),
            _bars(out / "decode_tokens_per_s.png", ok, key, list(dict.fromkeys(map(key, ok))), "decode throughput",
                  metric="decode_tokens_per_s", ylabel="tokens/s")]


def _bars(path: Path, recs: list[dict], group, groups: list[str], title: str, metric: str = "median_ms",
          ylabel: str = "ms (median)") -> Path:
    backends = list(dict.fromkeys(r["backend"] for r in recs))
    fig = _figure(max(6, 1.2 * len(groups) * max(1, len(backends)) / 2), 4.5)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(backends))
    for i, b in enumerate(backends):
        values = {group(r): r[metric] for r in recs if r["backend"] == b}
        ax.bar([g + i * width for g in range(len(groups))], [values.get(g, 0.0) for g in groups], width, label=b)
    ax.set_xticks([g + width * (len(backends) - 1) / 2 for g in range(len(groups))], groups, rotation=20)
    ax.set(ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    return path
