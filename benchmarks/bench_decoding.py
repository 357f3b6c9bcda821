"""Per-token cost of recurrent decoding vs recomputing the whole forward pass, by context length.

For each context T: prefill T random tokens into a recurrent state (timed once), then time
  * recurrent: the eager model.step on one token from that state (O(1) in T), within a decode (the SSMs' step
    constants already made by `start_decoding`; the compiled step: bench_generate), and
  * recompute: the parallel forward over all T + 1 tokens, with the output head applied to the last
    position only (what decoding without a state costs per new token, at its cheapest),
in eval mode under torch.no_grad. Prints ms/token for both, their ratio, tokens/s of the recurrent
path, and max abs logit difference between the two (a correctness check: they compute the same logits).

    python -m benchmarks.bench_decoding --preset small-gss --contexts 1k,2k,4k,8k,16k
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks import common
from models import PRESETS, build_model


def last_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """LanguageModel.forward, but the head only on the last position: [B, T] -> [B, vocab]."""
    x = model.embed(ids)
    for block in model.blocks:
        x, _ = block(x)
    return model.head(model.norm(x[:, -1]))


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small-gss", choices=sorted(PRESETS))
    parser.add_argument("--contexts", type=common.int_list, default="1k,2k,4k,8k,16k")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--step-reps", type=int, default=50, help="timed recurrent steps per context")
    common.add_common_args(parser, reps=5, budget_s=20.0)
    args = parser.parse_args()
    device = common.setup(args)
    model = build_model(PRESETS[args.preset]).to(device).eval()

    rows = []
    for context in args.contexts:
        ids = common.random_tokens(model.cfg, args.batch, context + 1, device)
        with common.autocast(args, device):
            common.sync(device)
            start = time.perf_counter()
            _, prefilled = model.prefill(ids[:, :context], model.init_state(args.batch))
            state = model.start_decoding(prefilled, capacity=context + 1)  # also makes the SSMs' step constants
            common.sync(device)
            prefill_s = time.perf_counter() - start
            position = state.position.clone()
            step_logits = model.step(ids[:, context], state)
            full_logits = last_logits(model, ids)

            def one_step():  # the same token at the same position each time (the position goes back after it)
                model.step(ids[:, context], state)
                state.position.copy_(position)

            step = common.measure(one_step, device, args.warmup, args.step_reps, args.budget_s)
            full = common.measure(lambda: last_logits(model, ids), device, args.warmup, args.reps, args.budget_s)
        tokens_per_s = args.batch / step.median_s
        flops = common.flops_per_token(model, context, args.batch, "decode")
        rows.append({
            "context": context, "prefill (s, 1 run)": prefill_s, "recurrent (ms/token)": step.median_s * 1e3,
            "recompute (ms/token)": full.median_s * 1e3, "recompute / recurrent": full.median_s / step.median_s,
            "recurrent tokens/s": tokens_per_s, "MFU": common.mfu(flops, tokens_per_s, args.peak_tflops),
            "max abs dlogit": (step_logits.float() - full_logits.float()).abs().max().item(),
            "n (recurrent, recompute)": f"{step.n}, {full.n}",
        })  # fmt: skip
        print(f"T={context}: step {step.median_s * 1e3:.2f} ms, full {full.median_s * 1e3:.1f} ms", flush=True)

    print(f"\n{args.preset} ({model.num_parameters() / 1e6:.1f}M params), batch {args.batch}, {args.dtype}, "
          f"{common.describe(device)}\n")  # fmt: skip
    columns = ["context", "recurrent (ms/token)", "recompute (ms/token)", "recompute / recurrent",
               "recurrent tokens/s", "prefill (s, 1 run)", "max abs dlogit", "n (recurrent, recompute)"]  # fmt: skip
    if args.peak_tflops:
        columns.insert(5, "MFU")
    common.print_table(rows, columns)
    common.write_json(args, device, {"decoding": rows})


if __name__ == "__main__":
    main()
