"""Choosing the refit's defaults cheaply: one decoder layer, several settings, error on held-out windows.

Prunes the first `--layer` decoder layers of the model sequentially with SparseGPT (as `rose-export prune` does,
no refit), then prunes layer `--layer` and refits it with every setting in turn, from the same pruned weights:
trained on the first half of the calibration windows, scored on the other half (both losses: mean per-token
relative error and MSE to the dense layer's outputs). A setting that fits held-out windows better is a candidate
default; perplexity decides (README).
Usage:
    python scripts/refit_probe.py --calib ../shared/data/wikitext2/valid.tokens.txt --layer 6 \
        --settings 1e-4:64:relative,3e-4:64:relative,1e-4:64:mse
"""
from __future__ import annotations

import argparse
import functools
import json
import time

import torch

from rose.arch import decoder_layers, get_weight, linear_sublayers, set_weight
from rose.calibrate import capture_inputs, collect_stats, run_layer
from rose.config import PruneConfig
from rose.data import calibration_windows
from rose.dense_stream import DenseStream, token_error
from rose.methods import prune_weight
from rose.models import load_model
from rose.offload import calibration_mode
from rose.refit import layer_loss, refit_layer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--nsamples", type=int, default=32, help="half trains, half is held out")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--sparsity", default="2:4")
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--settings", required=True, help="comma-separated lr:steps:loss[:norms]")
    ap.add_argument("--out")
    args = ap.parse_args()
    model, tok = load_model(args.model)
    calib = calibration_windows(tok, args.calib, args.nsamples, args.seqlen, 0)
    half = args.nsamples // 2
    cfg = PruneConfig(method="sparsegpt", sparsity=args.sparsity, nsamples=args.nsamples, seqlen=args.seqlen)
    dense = DenseStream()
    rows = []
    with calibration_mode(model):
        inputs, kwargs = capture_inputs(model, calib, "cpu")
        for idx, layer in enumerate(decoder_layers(model)[:args.layer + 1]):
            subs = linear_sublayers(model, layer)
            run = functools.partial(run_layer, layer, kwargs=kwargs)
            stats, outs = collect_stats(layer, subs, inputs, kwargs, "cpu")
            dense.advance(run, outs)
            for name, mod in subs.items():
                set_weight(mod, prune_weight(get_weight(mod).float(), stats[name], cfg).weight)
            if idx < args.layer:
                inputs = run(inputs)
        pruned = {n: get_weight(m).clone() for n, m in subs.items()}
        train, held = inputs[:half], inputs[half:]
        t_train, t_held = dense.targets[:half], dense.targets[half:]
        before_held = token_error(run(held), t_held)
        mse_before = sum(float(layer_loss(o, t, "mse")) for o, t in zip(run(held), t_held)) / len(held)
        for setting in args.settings.split(","):
            lr, steps, loss, *norms = setting.split(":")
            for n, m in subs.items():
                set_weight(m, pruned[n])
            c = PruneConfig(method="sparsegpt", sparsity=args.sparsity, nsamples=args.nsamples, refit=True,
                            refit_lr=float(lr), refit_steps=int(steps), refit_loss=loss, refit_norms=bool(norms))
            saved = {k: v.clone() for k, v in layer.state_dict().items()}
            t0 = time.perf_counter()
            before = token_error(run(train), t_train)
            _, rec = refit_layer(layer, run, subs, train, t_train, before, c, args.layer)
            seconds = time.perf_counter() - t0
            outs = run(held)
            row = {"setting": setting, "train_before": rec["error_before"], "train_after": rec["error_after"],
                   "held_before": round(before_held, 6), "held_after": round(token_error(outs, t_held), 6),
                   "held_mse_before": round(mse_before, 6),
                   "held_mse_after": round(sum(float(layer_loss(o, t, "mse")) for o, t in zip(outs, t_held))
                                           / len(held), 6), "seconds": round(seconds, 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
            layer.load_state_dict(saved)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
