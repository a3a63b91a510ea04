"""Render the README quality tables from the recipes that scripts/quality_runs.sh leaves under RUNS_DIR.

Usage: python scripts/quality_table.py RUNS_DIR [--json OUT.json]
Perplexity cells show seed 0; where seeds 1 and 2 were run too, another table gives mean +- std over seeds. Runs
that also scored the second text (`--eval-data pydoc`, the recipe's `eval_extra`) get its tables too, and runs
with `--refit` the refit's layer errors before and after.
Wall-clock pruning times stay in the recipes (`prune_seconds`) but not in the table: on a shared machine they
measure the load; scripts/solver_timing.py measures the methods' costs side by side instead.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from rose.config import PruneConfig

PATTERNS = ["0.5", "0.6", "0.7", "4:8", "2:4"]
HEAD = {"0.5": "50%", "0.6": "60%", "0.7": "70%", "4:8": "4:8", "2:4": "2:4"}
ROWS = ["magnitude", "wanda", "sparsegpt", "rose", "rose --order best", "sparsegpt --permute", "magnitude --refit",
        "wanda --refit", "sparsegpt --refit", "rose --refit", "rose --order best --refit", "sparsegpt --refit --permute",
        "rose --order best --refit --permute"]
SECOND = "pydoc"   # the second evaluation text (rose/data.py)
REFIT_DEFAULTS = {k: PruneConfig.default(k) for k in ("refit_steps", "refit_lr", "refit_samples", "refit_loss")}


def label(cfg: dict) -> str:
    base = method_label(cfg)
    permute = ["--permute"] if cfg.get("permute") else []
    if not cfg.get("refit"):
        return " ".join([base, *permute])
    extras = [f"--{k.replace('_', '-')} " + (f"{cfg[k]:g}" if isinstance(cfg[k], float) else str(cfg[k]))
              for k, v in REFIT_DEFAULTS.items() if cfg.get(k, v) != v]
    if cfg.get("refit_norms"):
        extras.append("--refit-norms")
    return " ".join([base, "--refit", *extras, *permute])


def method_label(cfg: dict) -> str:
    name = cfg["method"]
    if name == "rose":
        if cfg.get("order") == "best":
            return "rose --order best"
        extras = []
        if cfg.get("rose_order", "both") != "both":
            extras.append(f"--rose-order {cfg['rose_order']}")
        if cfg.get("rose_threshold", 0.5) != 0.5:
            extras.append(f"--rose-threshold {cfg['rose_threshold']:g}")
        if cfg.get("rose_within_group", "keep") != "keep":
            extras.append(f"--rose-within-group {cfg['rose_within_group']}")
        if cfg.get("rose_scaler", "uniform") != "uniform":
            extras.append(f"--rose-scaler {cfg['rose_scaler']}")
        return " ".join([name, *extras])
    return name


def collect(runs: Path) -> tuple[dict, dict]:
    """(label, pattern, seed) -> results, and the dense evaluation."""
    table, dense = {}, None
    # a runs directory of quality_runs.sh, or the flat copies of its recipes in docs/quality/recipes
    for path in sorted(runs.glob("*/rose_recipe.json")) or sorted(runs.glob("*.json")):
        rec = json.loads(path.read_text())
        if "config" not in rec:
            dense = rec
            continue
        cfg = rec["config"]
        threads = rec.get("versions", {}).get("torch_threads", "unrecorded")
        table[(label(cfg), cfg["sparsity"], cfg["seed"])] = {**rec["results"], **guard_gap(rec.get("layers", [])),
                                                             "torch_threads": threads,
                                                             "second": second_text(rec["results"]),
                                                             "layer_records": refit_errors(rec.get("layers", []))}
    return table, dense


def refit_errors(records: list[dict]) -> list[float]:
    """Per decoder layer, the refit's final distance to the dense outputs (after, where kept; else before)."""
    fits = {r["layer"]: r["refit"] for r in records if "refit" in r}
    return [f["error_after"] if f["kept"] == "refit" else f["error_before"] for _, f in sorted(fits.items())]


def second_text(results: dict) -> float | None:
    """Perplexity on the second text, where the run scored it."""
    return next((e["perplexity"] for e in results.get("eval_extra", []) if e["data"] == SECOND), None)


def seed_table(title: str, table: dict, labels: list[str], value) -> list[str]:
    """Mean +- standard deviation over seeds 0, 1, 2 of `value(results)`, for every cell that has all three."""
    seeds = defaultdict(dict)
    for (r, p, s), res in table.items():
        if value(res) is not None:
            seeds[(r, p)][s] = value(res)
    multi = {k: v for k, v in seeds.items() if {0, 1, 2} <= set(v)}
    if not multi:
        return []
    out = [f"\n{title} (mean +- standard deviation over calibration seeds 0, 1, 2):\n"]
    pats = [p for p in PATTERNS if any(k[1] == p for k in multi)]
    out.append("| method | " + " | ".join(HEAD[p] for p in pats) + " |")
    out.append("|---|" + "---|" * len(pats))
    for r in labels:
        if not any(k[0] == r for k in multi):
            continue
        cells = []
        for p in pats:
            v = [multi[(r, p)][s] for s in (0, 1, 2)] if (r, p) in multi else None
            cells.append(f"{statistics.mean(v):.2f} +- {statistics.stdev(v):.2f}" if v else "")
        out.append(f"| {r} | " + " | ".join(cells) + " |")
    return out


def guard_gap(records: list[dict]) -> dict:
    """How far apart the layer guard's two candidates were: relative gap between the two layer errors, in %."""
    guards = {r["layer"]: r["layer_guard"] for r in records if "layer_guard" in r}
    gaps = sorted(abs(g["error_best"] - g["error_sparsegpt"]) / g["error_sparsegpt"] * 100
                  for g in guards.values() if g["error_sparsegpt"] > 0)
    if not gaps:
        return {}
    kept = [g["error_best"] if g["kept"] == "best" else g["error_sparsegpt"] for _, g in sorted(guards.items())]
    return {"guard_gap_median_pct": statistics.median(gaps), "guard_gap_max_pct": gaps[-1],
            "layer_error_mean": statistics.mean(kept), "layer_error_last": kept[-1]}


def render(table: dict, dense: dict | None) -> str:  # noqa: C901 (one table after another)
    # the thread count moves SparseGPT's masks (scripts/quality_runs.sh): say whether the cells are comparable
    threads = defaultdict(int)
    for res in table.values():
        threads[res["torch_threads"]] += 1
    out = ["torch CPU threads: " + ", ".join(f"{t} in {n} of {len(table)} runs" for t, n in sorted(threads.items()))
           + ("" if len(threads) == 1 else " (cells that differ in threads are not computed alike)") + "\n"]
    labels = [r for r in ROWS if any(k[0] == r for k in table)] + sorted(
        {k[0] for k in table} - set(ROWS))
    main = [r for r in labels if r in ROWS]
    out.append("| method | " + " | ".join(HEAD[p] for p in PATTERNS) + " |")
    out.append("|---|" + "---|" * len(PATTERNS))
    if dense:
        out.append(f"| dense | {dense['perplexity']:.2f} |" + " |" * (len(PATTERNS) - 1))
    for r in main:
        cells = []
        for p in PATTERNS:
            res = table.get((r, p, 0))
            cells.append(f"{res['eval']['perplexity']:.2f}" if res else "")
        out.append(f"| {r} | " + " | ".join(cells) + " |")

    out.append("\nMean relative reconstruction error `||WX - W'X|| / ||WX||` over the 210 sublayers (on each "
               "sublayer's own calibration inputs; seed 0; for `--refit` rows, of the weights as pruned, before the "
               "refit) and, for ROSE, the share of sublayers found columnar:\n")
    out.append("| method | " + " | ".join(HEAD[p] for p in PATTERNS) + " |")
    out.append("|---|" + "---|" * len(PATTERNS))
    for r in main:
        cells = []
        for p in PATTERNS:
            res = table.get((r, p, 0))
            if not res:
                cells.append("")
                continue
            cell = f"{res['mean_rel_error']:.4f}"
            if "columnar_fraction" in res:
                cell += f" ({100 * res['columnar_fraction']:.0f}% col.)"
            cells.append(cell)
        out.append(f"| {r} | " + " | ".join(cells) + " |")

    best = {p: table[("rose --order best", p, 0)] for p in PATTERNS if ("rose --order best", p, 0) in table}
    if best:
        out.append("\nWhich order `--order best` kept, per sublayer (of 210; seed 0): the lowest reconstruction error "
                   "among the identity (SparseGPT), ROSE's order where the layer is columnar, and descending diag(H), "
                   "after the decoder-layer guard:\n")
        out.append("| order | " + " | ".join(HEAD[p] for p in best) + " |")
        out.append("|---|" + "---|" * len(best))
        for order, name in (("identity", "identity"), ("rose", "ROSE"), ("diag_h", "diag(H)")):
            out.append(f"| {name} | " + " | ".join(str(r.get("chosen_orders", {}).get(order, 0))
                                                   for r in best.values()) + " |")
        if any("guarded_layers" in r for r in best.values()):
            out.append("| decoder layers reverted to SparseGPT by the layer guard (of those it checked) | " + " | ".join(
                f"{r['guard_kept_sparsegpt']} of {r['guarded_layers']}" if "guarded_layers" in r else ""
                for r in best.values()) + " |")
            out.append("| gap between the guard's two layer errors, median (max) | " + " | ".join(
                f"{r['guard_gap_median_pct']:.2f}% ({r['guard_gap_max_pct']:.2f}%)" if "guard_gap_median_pct" in r
                else "" for r in best.values()) + " |")

    out += seed_table("Perplexity on WikiText-2", table, labels, lambda res: res["eval"]["perplexity"])

    second = [r for r in labels if any(k[0] == r and res["second"] is not None for k, res in table.items())]
    if second or (dense and "eval_extra" in dense):
        out.append(f"\nPerplexity on the second text, `{SECOND}` (Python's own documentation; calibration never sees "
                   "it), seed 0:\n")
        pats = [p for p in PATTERNS if any(k[1] == p and res["second"] is not None for k, res in table.items())]
        out.append("| method | " + " | ".join(HEAD[p] for p in pats) + " |")
        out.append("|---|" + "---|" * len(pats))
        if dense and "eval_extra" in dense:
            out.append(f"| dense | {second_text(dense):.2f} |" + " |" * (len(pats) - 1))
        for r in second:
            cells = [table.get((r, p, 0), {}).get("second") for p in pats]
            out.append(f"| {r} | " + " | ".join(f"{c:.2f}" if c is not None else "" for c in cells) + " |")
        out += seed_table(f"Perplexity on `{SECOND}`", table, labels, lambda res: res["second"])

    refits = [(r, p) for r in labels for p in PATTERNS if "refit" in table.get((r, p, 0), {})]
    if refits:
        out.append("\nThe refit, seed 0: decoder layers kept refitted (of 30), and the mean over layers of the "
                   "distance to the dense model's layer outputs (mean per-token relative error), as pruned -> as "
                   "kept:\n")
        out.append("| method | pattern | layers kept | layer error before -> after | last layer, after | the same "
                   "without the refit: mean (last layer), from the layer guard's records |")
        out.append("|---|---|---|---|---|---|")
        for r, p in refits:
            res = table[(r, p, 0)]
            f = res["refit"]
            last = res["layer_records"][-1]
            plain = table.get((r.split(" --refit")[0], p, 0), {})
            base = (f"{plain['layer_error_mean']:.4f} ({plain['layer_error_last']:.4f})"
                    if "layer_error_mean" in plain else "")
            out.append(f"| {r} | {HEAD[p]} | {f['kept']} of {f['layers']} | {f['mean_error_before']:.4f} -> "
                       f"{f['mean_error_after']:.4f} | {last:.4f} | {base} |")

    ablation = [r for r in labels if r not in ROWS and (r, "0.7", 0) in table]
    if ablation:
        out.append("\nAblation at 70% (seed 0):\n")
        out.append("| variant | perplexity | columnar sublayers | mean rel. error |")
        out.append("|---|---|---|---|")
        for r in ["sparsegpt", "rose", *ablation]:
            res = table.get((r, "0.7", 0))
            if res:
                col = f"{100 * res['columnar_fraction']:.0f}%" if "columnar_fraction" in res else "-"
                out.append(f"| {r} | {res['eval']['perplexity']:.2f} | {col} | {res['mean_rel_error']:.4f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path)
    ap.add_argument("--json", type=Path, help="also write every run's results as JSON")
    args = ap.parse_args()
    table, dense = collect(args.runs)
    print(render(table, dense))
    if args.json:
        rows = [{"method": k[0], "sparsity": k[1], "seed": k[2], **v} for k, v in sorted(table.items())]
        args.json.write_text(json.dumps({"dense": dense, "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
