"""Shared helpers of the benchmarks: flags, timing, the train step, model FLOPs / MFU, tables, JSON, old `models`.

Timing: `warmup` untimed calls, then up to `reps` timed calls (time.perf_counter, with
torch.cuda.synchronize() before and after each on CUDA); the median is reported. A call stops
early once the timed calls add up to `budget_s` seconds (at least one is always timed), so slow
sizes get fewer repetitions instead of being skipped. torch.set_num_threads is left at the default.

Model FLOPs per token (a multiply-add is 2 FLOPs; training = forward + backward = 3 x forward):

    forward = 2 * P                                   dense matmuls: P = every parameter except the
                                                      SSM and LayerNorm ones (a tied embedding is
                                                      counted once, as the output head)
            + sum over attention layers  4 * E * ctx  QK^T and AV; ctx = keys a token attends to:
                                                      L/2 for causal training (min(L, chunk)/2 for
                                                      local attention), T when decoding at context T
            + sum over SSM layers (H channels, N modes):
                  training / full forward:  4*H*N/B + 15*H*log2(2L)   kernel K = Re(W lam^l), made
                                                      once per sequence of the batch B, plus three
                                                      real FFTs of length 2L (2.5 n log2 n each)
                  decoding step:            10*H*N    the recurrence x = lam x + u, y = Re(W x)
    training = 3 * forward  (so ~6 * P + attention + SSM, the usual 6N rule)

MFU = FLOPs per token * tokens/s / peak FLOP/s, the peak given by --peak-tflops (e.g. 989 for an H100
SXM in dense bf16). The SSM terms count the FFT method's FLOPs for both kernels: they are model
FLOPs, not what a particular kernel executes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from models import LanguageModel, ModelConfig


def cpu_busy(seconds: float = 0.5) -> float | None:
    """Fraction of all CPU time that was busy over the next `seconds` (Linux /proc/stat), else None."""

    def read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # (total, idle + iowait)

    try:
        total0, idle0 = read()
        time.sleep(seconds)
        total1, idle1 = read()
    except (OSError, ValueError, IndexError):
        return None
    return 1 - (idle1 - idle0) / (total1 - total0) if total1 > total0 else None


def add_common_args(parser: argparse.ArgumentParser, reps: int = 5, budget_s: float = 60.0) -> None:
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast to bfloat16")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing each case")
    parser.add_argument("--reps", type=int, default=reps, help="timed calls per case (median reported)")
    parser.add_argument("--budget-s", type=float, default=budget_s, help="stop timing a case after this many s")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s of the device, for MFU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the results as JSON to this path")


def int_list(text: str) -> list[int]:
    """'1k,2k,4096' -> [1024, 2048, 4096]."""
    return [int(float(x[:-1]) * 1024) if x.lower().endswith("k") else int(x) for x in text.split(",") if x]


def setup(args: argparse.Namespace) -> torch.device:
    """Seed, pick the device; warn when other processes load the CPU (timings would be noisy)."""
    torch.manual_seed(args.seed)
    args.cpu_busy_at_start = busy = cpu_busy()
    if busy is not None and busy > 0.1:
        print(f"warning: other processes keep {busy:.0%} of the CPU busy: timings will be noisy")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def autocast(args: argparse.Namespace, device: torch.device):
    """bf16 autocast for --dtype bf16 (the SSM itself always runs in float32), else nothing."""
    if args.dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    median_s: float
    n: int  # timed calls


def measure(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int, budget_s: float) -> Timing:
    """Median wall time of fn() over up to `reps` calls after `warmup` untimed ones (see module doc)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    while len(times) < max(reps, 1):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
        if sum(times) >= budget_s:
            break
    return Timing(statistics.median(times), len(times))


def peak_bytes(prof: torch.profiler.profile) -> int:
    """The highest running total of the allocations minus frees a CPU profile (`profile_memory=True`) saw."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    total = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        total += event.nbytes()
        peak = max(peak, total)
    return peak


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Bytes fn() holds at its most, over what was allocated before it: the CUDA allocator's peak, or on a CPU the
    profiler's running total (`peak_bytes`)."""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return peak_bytes(prof)


def top_ops(fn: Callable[[], Any], device: torch.device, k: int) -> list[tuple[str, float]]:
    """The k ops with the most self time (on the GPU where there is one) in one more call of fn: [(op, ms)]."""
    with torch.profiler.profile() as prof:
        fn()
        sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    ops = sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)[:k]
    return [(e.key, getattr(e, attr) / 1e3) for e in ops]


def random_tokens(cfg: ModelConfig, batch: int, length: int, device: torch.device) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, length), device=device)


def train_step(
    model: LanguageModel, ids: torch.Tensor, args: argparse.Namespace, optimizer: torch.optim.Optimizer | None = None
) -> Callable[[], None]:
    """A closure running forward + next-token loss + backward (+ optimizer step and zero_grad if given)."""
    device = ids.device

    def step() -> None:
        with autocast(args, device):
            _, loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)

    return step


def dense_params(model: LanguageModel) -> int:
    """Parameters that enter matmuls: all but the SSM's and LayerNorms' (a tied embedding counts once)."""
    skip = {id(p) for m in model.modules() if type(m).__name__ in ("DiagonalSSM", "LayerNorm") for p in m.parameters()}
    if not model.cfg.tie_embeddings:
        skip.add(id(model.embed.weight))  # a lookup, not a matmul
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def flops_per_token(model: LanguageModel, length: int, batch: int = 1, mode: str = "train") -> float:
    """Model FLOPs per token, formula in the module docstring. mode: 'train' | 'forward' | 'decode'.

    `length` is the sequence length L (train / forward) or the context T already decoded (decode).
    """
    cfg = model.cfg
    flops = 2.0 * dense_params(model)
    for kind in cfg.layer_kinds():
        if kind in ("attention", "local_attention"):
            span = length if kind == "attention" else min(length, cfg.attn_chunk)
            flops += 4.0 * cfg.d_model * (span if mode == "decode" else span / 2)
        else:
            h, n = (cfg.d_ssm if kind == "gss" else cfg.d_model), cfg.state_size
            flops += 10.0 * h * n if mode == "decode" else 4.0 * h * n / batch + 15.0 * h * math.log2(2 * length)
    return 3.0 * flops if mode == "train" else flops


def mfu(flops_token: float, tokens_per_s: float, peak_tflops: float | None) -> float | None:
    return None if not peak_tflops else flops_token * tokens_per_s / (peak_tflops * 1e12)


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0 or math.isnan(value):
            return f"{value:g}"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Print rows as a markdown table, with the given keys as columns (absent keys print '-')."""
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(fmt(row.get(c)) for c in columns) + " |")
    print()


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def models_at(revision: str) -> ModuleType | None:
    """The `models` package as it was at `revision`, imported as `models_before` (None without git)."""
    folder = tempfile.mkdtemp(prefix="models-before-")
    try:
        archive = subprocess.run(["git", "archive", revision, "models"], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"no 'before' column: cannot read models/ at {revision} from git ({e})")
        return None
    spec = importlib.util.spec_from_file_location("models_before", f"{folder}/models/__init__.py",
                                                  submodule_search_locations=[f"{folder}/models"])  # fmt: skip
    module = importlib.util.module_from_spec(spec)
    sys.modules["models_before"] = module
    spec.loader.exec_module(module)
    return module


def write_json(args: argparse.Namespace, device: torch.device, results: dict[str, list[dict[str, Any]]]) -> None:
    """Write {command, date, device, args, results} to --out, if given."""
    if not args.out:
        return
    record = {
        "command": " ".join(["python", "-m", sys.modules["__main__"].__spec__.name, *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": describe(device),
        "args": vars(args),
        "results": results,
    }
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {args.out}")
