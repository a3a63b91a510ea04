"""Issue 20, item 2: do free input-channel permutations pay for N:M on SmolLM2? A measurement, not a feature.

Two permutations leave the dense model's function unchanged, because the neighbouring layer absorbs them:
- `down_proj`'s input channels (the MLP's intermediate units), with the rows of `gate_proj` and `up_proj`;
- `o_proj`'s input channels within each attention head, with the rows of `v_proj`; under grouped-query attention
  the query heads that share a value head must share its permutation.
A permutation changes which input channels share an N:M group. This script searches, per sublayer, a balanced
permutation that maximises the Wanda saliency `|W_ij| * ||X_j||` that N:M keeps (random pairings of groups, the
best of the 35 ways to split each pair's 2M columns into two groups, never worse than before; Pool & Yu's channel
swaps in spirit), on the dense model's calibration statistics; reports how much of the saliency that N:M loses it
wins back; applies the permutations, checks that the dense logits are unchanged, and saves the permuted dense
model, which `rose-export prune --model DIR` then prunes with the README's protocol.
Usage:
    python scripts/permutation_study.py --calib ../shared/data/wikitext2/valid.tokens.txt --out runs/permuted
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from rose.arch import decoder_layers
from rose.data import calibration_windows
from rose.models import load_model
from rose.offload import calibration_mode


def kept(S: torch.Tensor, m: int, keep: int) -> float:
    """Saliency that N:M keeps: in each row, the `keep` largest of every group of `m` consecutive columns."""
    return float(S.reshape(S.shape[0], -1, m).topk(keep, dim=-1).values.sum())


def balanced_permutation(S: torch.Tensor, m: int = 4, keep: int = 2, rounds: int = 200, seed: int = 0):
    """A column permutation `perm` (new position -> old column) of saliency `S` (rows x cols) that keeps more."""
    rows, cols = S.shape
    groups = cols // m
    g = torch.Generator().manual_seed(seed)
    first = [c for c in itertools.combinations(range(2 * m), m) if 0 in c]  # the splits of 2M columns, (0..M-1) first
    A = torch.tensor(first)
    B = torch.tensor([[i for i in range(2 * m) if i not in c] for c in first])
    perm = torch.arange(cols)
    for _ in range(rounds):
        order = torch.randperm(groups, generator=g)
        pa, pb = order[: groups // 2], order[groups // 2: 2 * (groups // 2)]
        grid = perm.view(groups, m)
        both = torch.cat([grid[pa], grid[pb]], dim=1)                      # (pairs, 2M) column ids
        X = S[:, both]                                                      # (rows, pairs, 2M)
        score = (X[:, :, A].topk(keep, -1).values.sum(-1) + X[:, :, B].topk(keep, -1).values.sum(-1)).sum(0)
        best = score.argmax(dim=1)                                          # first maximum: ties keep the split
        grid = grid.clone()
        grid[pa], grid[pb] = both.gather(1, A[best]), both.gather(1, B[best])
        perm = grid.flatten()
    return perm


def column_energy(model, calib):
    """Mean squared input per column of every o_proj and down_proj, on the dense model."""
    sums, hooks = {}, []
    for i, layer in enumerate(decoder_layers(model)):
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            def hook(mod, args, out, key=(i, name)):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                s, n = sums.get(key, (0.0, 0))
                sums[key] = (s + (x * x).sum(0), n + x.shape[0])
            hooks.append(layer.get_submodule(name).register_forward_hook(hook))
    with calibration_mode(model):
        for row in calib:
            model(row.unsqueeze(0), use_cache=False)
    for h in hooks:
        h.remove()
    return {k: s / n for k, (s, n) in sums.items()}


def permute_layer(layer, cfg, energy_down: torch.Tensor, energy_o: torch.Tensor, rounds: int, seed: int,
                  m: int = 4, keep: int = 2) -> dict[str, dict[str, float]]:
    """Permute one decoder layer's `down_proj` and `o_proj` input channels, and the rows that feed them, so that N:M
    keeps more saliency; the layer computes the same function. Returns the saliency share N:M loses before/after."""
    mlp, attn = layer.mlp, layer.self_attn
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    share = cfg.num_attention_heads // cfg.num_key_value_heads
    out = {}
    # down_proj: permute intermediate units; gate/up rows follow
    S = mlp.down_proj.weight.abs() * energy_down.sqrt()
    perm = balanced_permutation(S, m, keep, rounds=rounds, seed=seed)
    total = float(S.sum())
    out["down_proj"] = {"lost_before": 1 - kept(S, m, keep) / total,
                        "lost_after": 1 - kept(S[:, perm], m, keep) / total}
    mlp.down_proj.weight.copy_(mlp.down_proj.weight[:, perm])
    mlp.gate_proj.weight.copy_(mlp.gate_proj.weight[perm])
    mlp.up_proj.weight.copy_(mlp.up_proj.weight[perm])
    # o_proj: per value head, one permutation of its head_dim shared by the query heads that read it
    Wo = attn.o_proj.weight
    S = Wo.abs() * energy_o.sqrt()
    full = torch.arange(Wo.shape[1])
    for kv in range(cfg.num_key_value_heads):
        heads = range(kv * share, (kv + 1) * share)
        stacked = torch.cat([S[:, h * hd:(h + 1) * hd] for h in heads], dim=0)
        p = balanced_permutation(stacked, m, keep, rounds=rounds, seed=1000 * seed + kv)
        for h in heads:
            full[h * hd:(h + 1) * hd] = h * hd + p
        attn.v_proj.weight[kv * hd:(kv + 1) * hd] = attn.v_proj.weight[kv * hd + p].clone()
    total = float(S.sum())
    out["o_proj"] = {"lost_before": 1 - kept(S, m, keep) / total, "lost_after": 1 - kept(S[:, full], m, keep) / total}
    attn.o_proj.weight.copy_(Wo[:, full].clone())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--layers", help="comma-separated decoder layers to permute (default: all)")
    ap.add_argument("--out", type=Path, help="save the permuted dense model (and the report) here")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model(args.model)
    calib = calibration_windows(tok, args.calib, args.nsamples, args.seqlen, 0)
    probe = calib[:1]
    with calibration_mode(model):
        before_logits = model(probe, use_cache=False).logits
    energy = column_energy(model, calib)
    report = {"down_proj": [], "o_proj": []}
    with torch.no_grad():
        chosen = {int(x) for x in args.layers.split(",")} if args.layers else None
        for i, layer in enumerate(decoder_layers(model)):
            if chosen is not None and i not in chosen:
                continue
            lost = permute_layer(layer, model.config, energy[(i, "mlp.down_proj")], energy[(i, "self_attn.o_proj")],
                                 args.rounds, seed=i)
            for name, row in lost.items():
                report[name].append({"layer": i, **row})
        model.eval()
        after_logits = model(probe, use_cache=False).logits
    diff = float((after_logits - before_logits).abs().max())
    summary = {}
    for name, rows in report.items():
        b = sum(r["lost_before"] for r in rows) / len(rows)
        a = sum(r["lost_after"] for r in rows) / len(rows)
        gain = [(r["lost_before"] - r["lost_after"]) / r["lost_before"] for r in rows]
        summary[name] = {"mean_lost_before": round(b, 5), "mean_lost_after": round(a, 5),
                         "recovered_of_lost_mean": round(sum(gain) / len(gain), 4),
                         "recovered_of_lost_min": round(min(gain), 4), "recovered_of_lost_max": round(max(gain), 4)}
    result = {"model": args.model, "nsamples": args.nsamples, "seqlen": args.seqlen, "rounds": args.rounds,
              "layers_permuted": sorted(chosen) if chosen is not None else "all",
              "max_abs_logit_change": diff, "summary": summary, "layers": report}
    print(json.dumps({k: v for k, v in result.items() if k != "layers"}, indent=2))
    if args.out:
        model.save_pretrained(args.out, safe_serialization=True)
        tok.save_pretrained(args.out)
        (args.out / "permutation_study.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
