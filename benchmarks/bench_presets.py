"""Train-step speed of the model presets at their full depth: tokens/s and model FLOPs utilisation.

One train step = forward + next-token cross-entropy + backward + AdamW step (fused on CUDA), on random
tokens, for each preset in --presets (paper sizes by default: GSS 16 layers, DSS 15, GSS-Hybrid 16,
Transformer 12; E=1024, vocab --vocab). MFU uses the model FLOPs of `benchmarks.common` (derived in
BENCHMARKS.md, "Model FLOPs per token"). Meant for one GPU (see benchmarks/gpu.sh); on a CPU, pass small
presets and lengths.

    python -m benchmarks.bench_presets --device cuda --dtype bf16 --length 4096 --batch 8 --peak-tflops 989
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from benchmarks import common
from models import PRESETS, build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="paper-gss,paper-dss,paper-gss-hybrid,paper-transformer")
    parser.add_argument("--kernel", choices=("fft", "chunked"), default="fft", help="the SSM kernel")
    parser.add_argument("--layers", type=int, default=0, help="override every preset's depth (0: the preset's)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--profile", type=int, default=0, help="also list the K ops with most self time")
    common.add_common_args(parser, reps=10, budget_s=60.0)
    args = parser.parse_args()
    device = common.setup(args)

    rows = []
    for name in args.presets.split(","):
        cfg = replace(PRESETS[name], vocab_size=args.vocab, ssm_kernel=args.kernel)
        if args.layers:
            cfg = replace(cfg, n_layers=args.layers)
        model = build_model(cfg).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        runnable = torch.compile(model) if args.compile else model
        ids = common.random_tokens(cfg, args.batch, args.length + 1, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step = common.train_step(runnable, ids, args, optimizer)
        t = common.measure(step, device, args.warmup, args.reps, args.budget_s)
        tokens_per_s = args.batch * args.length / t.median_s
        flops = common.flops_per_token(model, args.length, args.batch, "train")
        rows.append({
            "preset": name, "arch": cfg.arch, "layers": cfg.n_layers, "params (M)": model.num_parameters() / 1e6,
            "step (s)": t.median_s, "steps/s": 1 / t.median_s, "tokens/s": tokens_per_s, "GFLOP/token": flops / 1e9,
            "MFU": common.mfu(flops, tokens_per_s, args.peak_tflops), "n": t.n,
            "peak memory (GB)": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
        })  # fmt: skip
        print(f"{name}: {t.median_s:.4f} s/step, {tokens_per_s:,.0f} tokens/s (n={t.n})", flush=True)
        if args.profile:
            rows[-1]["top ops"] = common.top_ops(step, device, args.profile)
            print("\n".join(f"  {ms:8.1f} ms  {op}" for op, ms in rows[-1]["top ops"]), flush=True)
        del model, optimizer, runnable
        if device.type == "cuda":
            torch.cuda.empty_cache()

    speeds = {row["preset"]: row["steps/s"] for row in rows}
    ratios = {"GSS/DSS steps/s": speeds["paper-gss"] / speeds["paper-dss"]} if {"paper-gss", "paper-dss"} <= set(
        speeds) else {}  # the paper: 2-3x on TPU at equal batch and length
    print(f"\nbatch {args.batch}, L={args.length}, vocab {args.vocab}, {args.dtype}, kernel {args.kernel}, "
          f"{'compiled' if args.compile else 'eager'}, {common.describe(device)}  {ratios}\n")  # fmt: skip
    common.print_table(rows, ["preset", "layers", "params (M)", "step (s)", "steps/s", "tokens/s", "GFLOP/token",
                              "MFU", "peak memory (GB)", "n"])  # fmt: skip
    common.write_json(args, device, {"train_step": rows, "ratios": [ratios]})


if __name__ == "__main__":
    main()
