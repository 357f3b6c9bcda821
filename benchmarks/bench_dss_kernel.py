"""DSS's kernel with a learned step per channel against Delta = 1: what the step costs in time and memory.

With Delta = 1 (GSS, and DSS before issue 35) every channel's powers exp(Lambda l) are the same [L, N], and the
kernel K [H, L] is one matmul. With a step per channel the powers are [H, N, L] (17 GB at paper-dss' H = 1024,
N = 512, L = 4k), so `models.ssm.per_channel_kernel` makes them in blocks of O(H N sqrt(L)), in groups of
channels. Cases, at paper-dss' sizes, batch 1:

  kernel  the kernel alone (`DiagonalSSM.kernel`: modes, then K)
  layer   the whole DSS layer (kernel and FFT convolution over u [1, H, L])

each for Delta = 1 and for the learned step, forward + backward up to --fwd-bwd-max and forward only (evaluation)
beyond. `peak MiB` is what one call holds at its most over what was there before it (the CUDA allocator's peak,
or on a CPU the profiler's running total of allocations less frees).

    python -m benchmarks.bench_dss_kernel --out benchmarks/results/dss_kernel_cpu.json
"""

from __future__ import annotations

import argparse

import torch

from benchmarks import common
from models import PRESETS
from models.ssm import DiagonalSSM


def bench(args: argparse.Namespace, device: torch.device) -> list[dict]:
    cfg = PRESETS["paper-dss"]
    rows = []
    for length in args.lengths:
        backward = length <= args.fwd_bwd_max
        for learned_step in (False, True):
            torch.manual_seed(args.seed)
            ssm = DiagonalSSM(cfg.d_model, cfg.state_size, learned_step=learned_step).to(device)
            u = torch.randn(1, cfg.d_model, length, device=device, requires_grad=backward)
            for case, output in (("kernel", lambda: ssm.kernel(length)), ("layer", lambda: ssm(u)[0])):

                def run() -> None:
                    with torch.set_grad_enabled(backward):
                        y = output()
                        if backward:
                            y.square().sum().backward()

                timing = common.measure(run, device, args.warmup, args.reps, args.budget_s)
                rows.append({
                    "case": case, "L": length, "step": "learned" if learned_step else "1",
                    "pass": "fwd+bwd" if backward else "fwd", "ms": 1e3 * timing.median_s, "n": timing.n,
                    "peak MiB": common.peak_memory(run, device) / 2**20,
                })  # fmt: skip
                print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=common.int_list, default="4k,64k")
    parser.add_argument("--fwd-bwd-max", type=common.int_list, default="4k", help="longer L: forward only")
    common.add_common_args(parser, reps=3)
    args = parser.parse_args()
    args.fwd_bwd_max = args.fwd_bwd_max[0]
    device = common.setup(args)
    rows = bench(args, device)
    common.print_table(rows, ["case", "L", "step", "pass", "ms", "n", "peak MiB"])
    common.write_json(args, device, {"dss_kernel": rows})


if __name__ == "__main__":
    main()
