"""ms per step of `model.generate`: the code before the static decode state (from git), the eager step and the fast
(compiled; on CUDA also graph-captured) step, side by side in one run; and the kernels one step runs.

For each preset and batch, with a random prompt of --prompt tokens and greedy decoding, a step's time is
(time of generate(n + 2) - time of generate(2)) / n: both include the same prefill, buffers and first step (and
on CUDA the graph capture), so the difference is n steps.
Columns:
  before      the models/ package of git revision --before (the in-place state did not exist yet), its
              `generate` in float32 (on CUDA under bf16 autocast, as it ran there);
  eager       `generate(fast=False)`, float32 weights;
  fast        `generate()` with float32 weights (the default on a CPU);
  fast bf16   `generate()` after `cast_for_decoding(model, bfloat16)` (the default on a GPU; the SSMs stay float32).
Kernels per step: eager, the ATen ops one step dispatches (top-level ones: a linear counts once, not as linear +
addmm); fast on a CPU, the calls of Inductor's generated code (fused kernels and library matmuls); on CUDA the device
kernels the profiler sees for one step (a replayed graph launches once, whatever it holds).
Checks: greedy tokens of the fast step equal the eager step's (float32), and the bf16 fast step's logits are within
max |dlogit| of the float32 eager step's over the first 8 steps.

    python -m benchmarks.bench_generate --presets small-gss,paper-gss --batches 1,16,64
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import re
import time

import torch
from torch._inductor.utils import run_and_get_code

from benchmarks import common
from models import PRESETS, LanguageModel, build_model
from models.decoding import cast_for_decoding, compiled_model_step


def ms_per_step(generate, device: torch.device, steps: int, reps: int) -> float:
    """Median over reps of (generate(steps + 2) - generate(2)) / steps, after one untimed call."""

    def timed(n: int) -> float:
        common.sync(device)
        start = time.perf_counter()
        generate(n)
        common.sync(device)
        return time.perf_counter() - start

    timed(2)
    samples = sorted((timed(steps + 2) - timed(2)) / steps for _ in range(reps))
    return samples[len(samples) // 2] * 1e3


def eager_ops(model: LanguageModel, ids: torch.Tensor, device: torch.device) -> int:
    """Top-level ATen ops (CPU) or device kernels (CUDA) of one eager step."""
    _, prefilled = model.prefill(ids, model.init_state(len(ids)))
    state = model.start_decoding(prefilled, ids.shape[1] + 1)
    return count_kernels(lambda: model.step(ids[:, -1], state), device)


def count_kernels(fn, device: torch.device) -> int:
    with torch.profiler.profile() as prof:
        fn()
        common.sync(device)
    events = prof.events()
    if device.type == "cuda":
        return sum(e.device_type == torch.autograd.DeviceType.CUDA for e in events)
    top = [e for e in events if e.name.startswith("aten::")
           and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]  # fmt: skip
    return len(top)


def fast_kernels(model: LanguageModel, ids: torch.Tensor, device: torch.device) -> int:
    """Kernels one compiled step runs: on a CPU, the calls of Inductor's generated code (its fused kernels and the
    library matmuls) in a fresh compile; on CUDA, what the profiler sees (without the graph)."""
    _, prefilled = model.prefill(ids, model.init_state(len(ids)))
    state = model.start_decoding(prefilled, ids.shape[1] + 4)
    if device.type == "cuda":
        compiled_model_step(model, ids[:, -1], state)
        return count_kernels(lambda: compiled_model_step(model, ids[:, -1], state), device)
    torch._dynamo.reset()
    _, code = run_and_get_code(compiled_model_step, model, ids[:, -1], state)
    return sum(len(re.findall(r"^\s+(?:cpp_fused_\w+|extern_kernels\.\w+)\(", c, re.MULTILINE)) for c in code)


def check(model: LanguageModel, low: LanguageModel, ids: torch.Tensor, tokens: int) -> dict[str, float | bool]:
    """Greedy tokens fast vs eager in float32; the bf16 fast step's (`low`) logits against float32 eager's, fed the
    same tokens: the eager decode's first 8."""
    eager = model.generate(ids, tokens, temperature=0, fast=False)
    fast = model.generate(ids, tokens, temperature=0)
    states = []
    for m in (model, low):
        _, prefilled = m.prefill(ids, m.init_state(len(ids)))
        states.append(m.start_decoding(prefilled, eager.shape[1]))
    worst = 0.0
    for t in range(ids.shape[1], min(eager.shape[1], ids.shape[1] + 8)):
        reference = model.step(eager[:, t], states[0])
        logits = compiled_model_step(low, eager[:, t], states[1])
        worst = max(worst, (logits.float() - reference).abs().max().item())
    return {"greedy tokens fast = eager (fp32)": torch.equal(fast, eager), "bf16 max |dlogit|": worst}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="small-gss,paper-gss")
    parser.add_argument("--batches", type=common.int_list, default="1,16,64")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    parser.add_argument("--steps", type=int, default=16, help="steps per timed generate (and tokens checked)")
    parser.add_argument("--before", default="2c3a260", help="git revision of the 'before' column ('' skips it)")
    common.add_common_args(parser, reps=3)
    args = parser.parse_args()
    device = common.setup(args)
    before = common.models_at(args.before) if args.before else None
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())  # fmt: skip

    rows = []
    for preset in args.presets.split(","):
        torch.manual_seed(args.seed)
        model = build_model(PRESETS[preset]).to(device).eval()
        old = None
        if before is not None:  # the same weights: today's model loads the old layout (not the other way round)
            old = before.build_model(before.PRESETS[preset]).to(device).eval()
            model.load_state_dict(old.state_dict())
        low = cast_for_decoding(copy.deepcopy(model), torch.bfloat16)
        layers = model.cfg.n_layers
        for batch in args.batches:
            ids = common.random_tokens(model.cfg, batch, args.prompt, device)
            row = {"preset": preset, "batch": batch}
            if old is not None:
                with autocast:
                    row["before"] = ms_per_step(lambda n: old.generate(ids, n, temperature=0), device, args.steps,
                                                args.reps)  # fmt: skip
            row["eager"] = ms_per_step(lambda n: model.generate(ids, n, temperature=0, fast=False), device,
                                       args.steps, args.reps)  # fmt: skip
            start = time.perf_counter()
            model.generate(ids, 2, temperature=0)
            row["first fast call (s)"] = time.perf_counter() - start  # the compile, unless cached for this shape
            row["fast"] = ms_per_step(lambda n: model.generate(ids, n, temperature=0), device, args.steps, args.reps)
            row["fast bf16"] = ms_per_step(lambda n: low.generate(ids, n, temperature=0), device, args.steps,
                                           args.reps)  # fmt: skip
            reference = row.get("before", row["eager"])
            row["speed-up fast"] = reference / row["fast"]
            row["speed-up fast bf16"] = reference / row["fast bf16"]
            row["kernels/layer eager"] = eager_ops(model, ids, device) / layers
            row["kernels/layer fast"] = fast_kernels(model, ids, device) / layers
            row["tokens/s fast bf16"] = batch / row["fast bf16"] * 1e3
            row.update(check(model, low, ids, args.steps))
            rows.append(row)
            print({k: common.fmt(v) for k, v in row.items()}, flush=True)

    print(f"\nms per step of generate (prompt {args.prompt}, greedy), {common.describe(device)}\n")
    columns = ["preset", "batch", "before", "eager", "fast", "fast bf16", "speed-up fast", "speed-up fast bf16",
               "tokens/s fast bf16", "kernels/layer eager", "kernels/layer fast", "first fast call (s)",
               "greedy tokens fast = eager (fp32)", "bf16 max |dlogit|"]  # fmt: skip
    common.print_table(rows, columns)
    common.write_json(args, device, {"generate": rows})


if __name__ == "__main__":
    main()
