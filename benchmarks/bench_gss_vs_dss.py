"""Train-step speed of GSS vs DSS at the paper's width (E=1024, F=4096, H=256, N=512, L=4096).

One train step = forward + next-token cross-entropy + backward + AdamW step, for the "paper-gss"
and "paper-dss" presets with the depth and batch reduced by flags, under both SSM kernels ("fft"
and "chunked"). Prints steps/s, tokens/s, MFU (with --peak-tflops) and the GSS/DSS speed ratio
per kernel. The 0-layer model (embedding, head, AdamW) is timed too: subtracting it gives the
time of one layer, from which the step time at the paper's depth (GSS 16, DSS 15 layers) is
extrapolated, since at 2 layers the 32k-vocabulary head dominates. The paper reports GSS 2-3x
faster than DSS on TPU (1.8 -> 5.3 steps/s).

    python -m benchmarks.bench_gss_vs_dss --layers 2 --batch 1 --length 4096
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from benchmarks import common
from models import PRESETS, build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="layers of each model (paper: GSS 16, DSS 15)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--kernels", default="fft,chunked")
    common.add_common_args(parser, reps=3, budget_s=60.0)
    args = parser.parse_args()
    device = common.setup(args)

    def time_step(cfg) -> tuple[common.Timing, object]:
        model = build_model(cfg).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = common.random_tokens(cfg, args.batch, args.length + 1, device)
        step = common.train_step(model, ids, args, optimizer)
        return common.measure(step, device, args.warmup, args.reps, args.budget_s), model

    # Embedding + head + AdamW alone (0 layers): subtracted to get the cost of one layer, which
    # extrapolates the step time to the paper's depth (GSS 16 layers, DSS 15).
    base, _ = time_step(replace(PRESETS["paper-gss"], n_layers=0, vocab_size=args.vocab))
    print(f"0 layers (embedding + head + AdamW): {base.median_s:.3f} s/step (n={base.n})", flush=True)
    rows = []
    for kernel in args.kernels.split(","):
        for arch in ("gss", "dss"):
            paper = PRESETS[f"paper-{arch}"]
            cfg = replace(paper, n_layers=args.layers, vocab_size=args.vocab, ssm_kernel=kernel)
            t, model = time_step(cfg)
            tokens_per_s = args.batch * args.length / t.median_s
            flops = common.flops_per_token(model, args.length, args.batch, "train")
            per_layer = (t.median_s - base.median_s) / args.layers
            rows.append({
                "model": arch.upper(), "kernel": kernel, "params (M)": model.num_parameters() / 1e6,
                "step (s)": t.median_s, "steps/s": 1 / t.median_s, "tokens/s": tokens_per_s,
                "GFLOP/token": flops / 1e9, "MFU": common.mfu(flops, tokens_per_s, args.peak_tflops), "n": t.n,
                "per layer (s)": per_layer, "paper depth": paper.n_layers,
                "est. paper-depth steps/s": 1 / (base.median_s + paper.n_layers * per_layer),
            })  # fmt: skip
            print(f"{arch} {kernel}: {t.median_s:.3f} s/step (n={t.n})", flush=True)
            del model
        gss, dss = rows[-2], rows[-1]
        gss["GSS/DSS speed"] = gss["steps/s"] / dss["steps/s"]
        gss["GSS/DSS per layer"] = dss["per layer (s)"] / gss["per layer (s)"]
        gss["GSS/DSS est. paper depth"] = gss["est. paper-depth steps/s"] / dss["est. paper-depth steps/s"]

    print(f"\nE=1024 F=4096 H=256 N=512, {args.layers} layers, batch {args.batch}, L={args.length}, "
          f"vocab {args.vocab}, {args.dtype}, {common.describe(device)}\n")  # fmt: skip
    print(f"0 layers (embedding + head + AdamW): {base.median_s:.3f} s/step (n={base.n})\n")
    columns = ["model", "kernel", "params (M)", "step (s)", "steps/s", "tokens/s", "GSS/DSS speed", "per layer (s)",
               "GSS/DSS per layer", "est. paper-depth steps/s", "GSS/DSS est. paper depth", "n"]  # fmt: skip
    if args.peak_tflops:
        columns[-1:-1] = ["GFLOP/token", "MFU"]
    common.print_table(rows, columns)
    common.write_json(args, device, {"train_step": rows, "zero_layers_step_s": base.median_s})


if __name__ == "__main__":
    main()
