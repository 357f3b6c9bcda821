"""SSM kernel speed by sequence length, and where GSS overtakes attention.

(a) `ssm`: one models.ssm.DiagonalSSM layer (H=256 channels, N=512 modes, batch 1), forward +
    backward, with the "fft" kernel vs the "chunked" kernel at several chunk sizes, for L up to 64k.
    Lengths above --fwd-bwd-max are timed forward only (under no_grad) to bound the run time; the
    table's `pass` column says which. `others' CPU share` is the CPU time other processes took while
    a case was timed (/proc/stat busy time less this process's own), as a share of all cores, the
    most over the row's cases: near 0 means the row had the machine to itself.
(b) `model`: whole-model forward + backward (next-token loss, no optimizer) of GSS vs Transformer at
    the paper's width (E=1024, F=4096, 16 heads, vocab 32000) with reduced depth, batch 1.

    python -m benchmarks.bench_kernels --part ssm,model

--ssm-file times the DiagonalSSM of another copy of models/ssm.py in (a), e.g. the one before a change:

    git show 8d12870:models/ssm.py > /tmp/ssm_before.py
    python -m benchmarks.bench_kernels --part ssm --ssm-file /tmp/ssm_before.py
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from dataclasses import replace
from types import ModuleType

import torch

from benchmarks import common
from models import PRESETS, build_model


def load_ssm(path: str | None) -> ModuleType:
    """models.ssm, or the module in the file at `path` (a self-contained copy of models/ssm.py)."""
    if path is None:
        from models import ssm

        return ssm
    spec = importlib.util.spec_from_file_location("ssm_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ssm_input_shape(module: ModuleType, channels: int, length: int) -> tuple[int, int, int]:
    """A batch of one for the DiagonalSSM of `module`: [B, H, L] since it works on that layout (issue 32: the
    module has `fft_size`), [B, L, H] before."""
    return (1, channels, length) if hasattr(module, "fft_size") else (1, length, channels)


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine from /proc/stat, CPU seconds of this process)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    times = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), times.user + times.system


def bench_ssm(args: argparse.Namespace, device: torch.device) -> list[dict]:
    module = load_ssm(args.ssm_file)
    DiagonalSSM = module.DiagonalSSM
    variants = [("fft", None)] + [("chunked", int(c)) for c in args.chunks.split(",")]
    rows = []
    for length in args.ssm_lengths:
        backward = length <= args.fwd_bwd_max
        row = {"L": length, "pass": "fwd+bwd" if backward else "fwd", "others' CPU share": 0.0}
        u = torch.randn(ssm_input_shape(module, args.channels, length), device=device, requires_grad=backward)
        grad = torch.randn_like(u)
        for kernel, chunk in variants:
            name = kernel if chunk is None else f"{kernel}-{chunk}"
            layer = DiagonalSSM(args.channels, args.state_size, kernel, chunk or 128).to(device)

            def run() -> None:
                with torch.set_grad_enabled(backward), common.autocast(args, device):
                    y, _ = layer(u)
                if backward:
                    y.backward(grad)

            start, busy0, own0 = time.perf_counter(), *cpu_seconds()
            t = common.measure(run, device, args.warmup, args.reps, args.budget_s)
            busy1, own1 = cpu_seconds()
            others = ((busy1 - busy0) - (own1 - own0)) / ((time.perf_counter() - start) * os.cpu_count())
            row["others' CPU share"] = max(row["others' CPU share"], others)
            row[f"{name} (ms)"] = t.median_s * 1e3
            print(f"ssm L={length} {name} {row['pass']}: {t.median_s * 1e3:.1f} ms (n={t.n})", flush=True)
            if args.profile:
                row[f"{name} top ops"] = common.top_ops(run, device, args.profile)
                print("  " + ", ".join(f"{op} {ms:.1f}" for op, ms in row[f"{name} top ops"]), flush=True)
        row["fastest"] = min((k for k in row if k.endswith("(ms)")), key=row.get).removesuffix(" (ms)")
        rows.append(row)
    return rows


def bench_model(args: argparse.Namespace, device: torch.device) -> list[dict]:
    configs = {
        "GSS": replace(PRESETS["paper-gss"], n_layers=args.gss_layers, vocab_size=args.vocab),
        "Transformer": replace(PRESETS["paper-transformer"], n_layers=args.attn_layers, vocab_size=args.vocab),
    }
    rows = []
    for length in args.model_lengths:
        row = {"L": length}
        for name, cfg in configs.items():
            model = build_model(cfg).to(device)
            ids = common.random_tokens(cfg, 1, length + 1, device)
            t = common.measure(common.train_step(model, ids, args), device, args.warmup, args.reps, args.budget_s)
            tokens_per_s = length / t.median_s
            flops = common.flops_per_token(model, length, 1, "train")
            row.update({f"{name} (s)": t.median_s, f"{name} tokens/s": tokens_per_s, f"{name} n": t.n,
                        f"{name} MFU": common.mfu(flops, tokens_per_s, args.peak_tflops),
                        f"{name} params (M)": model.num_parameters() / 1e6})  # fmt: skip
            print(f"model L={length} {name}: {t.median_s:.2f} s (n={t.n})", flush=True)
            del model
        row["Transformer / GSS time"] = row["Transformer (s)"] / row["GSS (s)"]
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="ssm,model", help="ssm, model or both")
    parser.add_argument("--ssm-lengths", type=common.int_list, default="1k,2k,4k,8k,16k,32k,64k")
    parser.add_argument("--fwd-bwd-max", type=common.int_list, default="16k", help="longer L: forward only")
    parser.add_argument("--channels", type=int, default=256, help="H")
    parser.add_argument("--state-size", type=int, default=512, help="N")
    parser.add_argument("--chunks", default="64,128,256", help="chunk sizes of the chunked kernel")
    parser.add_argument("--ssm-file", default=None, help="(a): a copy of models/ssm.py to time instead")
    parser.add_argument("--profile", type=int, default=0, help="(a): also list the K ops with most self time")
    parser.add_argument("--model-lengths", type=common.int_list, default="1k,2k,4k,8k,16k")
    parser.add_argument("--gss-layers", type=int, default=2)
    parser.add_argument("--attn-layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32_000)
    common.add_common_args(parser, reps=3, budget_s=30.0)
    args = parser.parse_args()
    args.fwd_bwd_max = args.fwd_bwd_max[0]
    device = common.setup(args)
    results = {}
    print(common.describe(device), args.dtype)

    if "ssm" in args.part:
        results["ssm"] = rows = bench_ssm(args, device)
        print(f"\n(a) DiagonalSSM H={args.channels} N={args.state_size}, batch 1, ms per call\n")
        times = [k for k in rows[0] if k.endswith("(ms)")]
        common.print_table(rows, ["L", "pass", *times, "fastest", "others' CPU share"])
    if "model" in args.part:
        results["model"] = rows = bench_model(args, device)
        print(f"\n(b) forward+backward, E=1024, GSS {args.gss_layers} layers "
              f"({rows[0]['GSS params (M)']:.1f}M params) vs Transformer {args.attn_layers} layers "
              f"({rows[0]['Transformer params (M)']:.1f}M params), vocab {args.vocab}, batch 1\n")  # fmt: skip
        columns = ["L", "GSS (s)", "Transformer (s)", "Transformer / GSS time", "GSS tokens/s",
                   "Transformer tokens/s", "GSS n", "Transformer n"]  # fmt: skip
        if args.peak_tflops:
            columns[-2:-2] = ["GSS MFU", "Transformer MFU"]
        common.print_table(rows, columns)
    common.write_json(args, device, results)


if __name__ == "__main__":
    main()
