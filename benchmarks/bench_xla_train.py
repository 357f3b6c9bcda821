"""Training steps of the chunked GSS and DSS under torch_xla (SPMD data parallel), by device count.

The code path is a `gss train` worker's (as in tests/xla_steps.py): `make_backend(TrainConfig(backend="xla"))`
(`xr.use_spmd()`), the model built on the host and moved to the XLA device, `make_optimizer` (AdamW),
`backend.to_device(rows)` (the rows as one global batch sharded along the mesh's data axis) and
`pipeline.train.train_step` with `learning_rate(step)`; `train_step` ends in `torch_xla.sync()`. The models
are `models.PRESETS["paper-gss"]` / `["paper-dss"]` (E=1024, F=4096, H=256, N=512, 32k vocabulary) with
`n_layers` and `ssm_kernel="chunked"` replaced; each step trains on `--batch` random rows of L+1 tokens.

Each (arch, devices, precision) case runs in a process of its own, since the device count is fixed when
torch_xla starts (PJRT_DEVICE=CPU, CPU_NUM_DEVICES=devices); this script spawns itself once per case with
`--case`. Per step it records:

  * wall (s):      from the call of train_step until the device is idle (`xm.wait_device_ops()`), so a
                   step is timed whole; a `gss train` worker does not wait per step and overlaps the next
                   step's tracing with this step's execution,
  * host (s):      until train_step returns: tracing, compiling when there is something new to compile,
                   and at times the execution too (torch_xla.sync() does not always return before it),
  * cpu / wall:    the process's CPU seconds over wall seconds: how many cores the step got (at most the
                   machine's count; less when other processes share them). The CPU seconds of a step
                   ("cpu s/step", median) change far less than its wall time when the cores are shared,
  * loss:          `loss.item()` after each step (the steps are the same in every case: same seeds),
  * graphs:        `metrics.counter_value("UncachedCompile")`: graphs compiled so far in the process,
  * CompileTime:   torch_xla's `CompileTime` metric, its accumulated seconds so far.

The first `--warmup` steps are untimed; steps/s is 1 / the median wall time of the next `--steps` steps
("best step (s)": the fastest of them, the least disturbed when other processes share the cores).
"compile step 1 (s)" is the first step's wall time minus that median; "compile warm-up (s)" sums that excess
over the warm-up steps. Three graphs are expected: step 1's (it also creates AdamW's state), the mean of
the loss (`train_step` computes it after `step_done()`, so reading it runs a small graph of its own), and
from step 2 on the steady step, which must then be the only one. Peak RSS is the case process's ru_maxrss.
The driver stops a case (SIGKILL to that process) when the machine's MemAvailable falls below --min-free-gb,
so that the kernel's OOM killer never has to choose a process on a shared machine.
No persistent compilation cache is used (a worker's `xla_cache`), so every case compiles from nothing.

    PJRT_DEVICE=CPU .venv-xla/bin/python -m benchmarks.bench_xla_train --layers 1 --vocab 8192 \
        --precisions fp32,bf16 --max-rss-gb 14 --out benchmarks/results/xla_train_cpu.json

The defaults (2 layers, the 32k vocabulary) need more than 16 GB of host memory at L=4096 and batch 4.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.common import cpu_busy, print_table

COLUMNS = ["arch", "devices", "precision", "layers", "vocab", "compile step 1 (s)", "compile warm-up (s)",
           "CompileTime (s)", "step (s)", "best step (s)", "steps/s", "tokens/s", "cpu/wall", "cpu s/step",
           "graphs after step 1", "graphs after step 2", "graphs after last", "peak RSS (GB)", "loss"]


def run_case(args: argparse.Namespace) -> dict:
    """One case, in this process (started with CPU_NUM_DEVICES set): the measurements as a dict."""
    from dataclasses import replace

    import torch
    import torch_xla
    import torch_xla.core.xla_model as xm
    import torch_xla.debug.metrics as metrics
    import torch_xla.runtime as xr

    from models import PRESETS, build_model
    from pipeline.backends import make_backend
    from pipeline.config import TrainConfig
    from pipeline.train import learning_rate, make_optimizer, no_weight_decay, train_step

    arch, devices, precision = args.case.split(":")
    total = args.warmup + args.steps
    tc = TrainConfig(backend="xla", precision=precision, steps=total, warmup_steps=2, lr=1e-3)
    backend = make_backend(tc)  # no persistent cache: every case compiles from nothing
    assert xr.global_runtime_device_count() == int(devices), xr.global_runtime_device_count()
    cfg = replace(PRESETS[f"paper-{arch}"], n_layers=args.layers, ssm_kernel="chunked", vocab_size=args.vocab)
    torch.manual_seed(tc.seed)
    model = build_model(cfg).to(backend.device)
    undecayed = no_weight_decay(model)
    model = backend.wrap(model, tc)
    optimizer = make_optimizer(model, tc, undecayed)
    data = torch.Generator().manual_seed(1)

    def compile_seconds() -> float:
        data_ = metrics.metric_data("CompileTime")
        return data_[1] / 1e9 if data_ else 0.0  # (samples, accumulated ns, [(time, ns)])

    steps = []
    for step in range(total):
        rows = torch.randint(0, cfg.vocab_size, (args.batch, args.length + 1), generator=data)
        cpu0, start = time.process_time(), time.perf_counter()
        batch = backend.to_device(rows)
        loss, grad_norm = train_step(model, optimizer, backend, iter([batch]), 1, learning_rate(step, tc),
                                     tc.grad_clip)
        host = time.perf_counter() - start
        xm.wait_device_ops()
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu0
        steps.append({"step": step + 1, "wall_s": wall, "host_s": host, "cpu_s": cpu, "cpu_over_wall": cpu / wall,
                      "graphs": metrics.counter_value("UncachedCompile") or 0, "compile_time_s": compile_seconds(),
                      "loss": loss.item(), "grad_norm": grad_norm.item(),
                      "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20})
        print(f"[{args.case}] step {step + 1}/{total}: {wall:.2f} s (host {host:.2f} s, cpu/wall "
              f"{cpu / wall:.2f}), graphs {steps[-1]['graphs']}, loss {steps[-1]['loss']:.4f}", file=sys.stderr,
              flush=True)
    timed = [s["wall_s"] for s in steps[args.warmup:]]
    median = statistics.median(timed)
    tokens = args.batch * args.length
    return {
        "arch": arch, "devices": int(devices), "precision": precision, "layers": args.layers, "batch": args.batch,
        "L": args.length, "vocab": cfg.vocab_size, "params (M)": sum(p.numel() for p in model.parameters()) / 1e6,
        "compile step 1 (s)": steps[0]["wall_s"] - median,
        "compile warm-up (s)": sum(s["wall_s"] - median for s in steps[:args.warmup]),
        "CompileTime (s)": steps[-1]["compile_time_s"],
        "CompileTime after step 1 (s)": steps[0]["compile_time_s"], "step (s)": median, "best step (s)": min(timed),
        "steps/s": 1 / median,
        "tokens/s": tokens / median, "timed steps": len(timed),
        "cpu/wall": statistics.median(s["cpu_over_wall"] for s in steps[args.warmup:]),
        "cpu s/step": statistics.median(s["cpu_s"] for s in steps[args.warmup:]),
        "graphs after step 1": steps[0]["graphs"], "graphs after step 2": steps[min(1, total - 1)]["graphs"],
        "graphs after last": steps[-1]["graphs"],
        "peak RSS (GB)": steps[-1]["rss_gb"], "loss": steps[-1]["loss"],
        "batch sharding": torch_xla._XLAC._get_xla_sharding_spec(batch),
        "fallback_ops": backend.fallback_ops(), "source": source_files(), "per_step": steps,
    }


def case_name(row: dict) -> str:
    return f"{row['arch']}:{row['devices']}:{row['precision']}"


def case_order(row: dict) -> tuple:
    return row["precision"] != "fp32", row["arch"] != "gss", row["devices"]


def read_kb(path: str, key: str) -> int:
    """A `key:  N kB` line of a /proc file, in kB (0 if absent)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def watch(child: subprocess.Popen, args: argparse.Namespace) -> tuple[str, float]:
    """Wait for a case process; stop it (SIGKILL, by its pid) before it exhausts the machine's memory (other
    people's processes share it: the kernel's OOM killer could pick one of theirs), grows past --max-rss-gb
    or runs past --timeout-s.
    Returns (why it was stopped or failed, "" if it ran through; peak RSS sampled, GB)."""
    start, peak_kb, why = time.perf_counter(), 0, ""
    while child.poll() is None:
        peak_kb = max(peak_kb, read_kb(f"/proc/{child.pid}/status", "VmRSS"))
        available_gb = read_kb("/proc/meminfo", "MemAvailable") / 2**20
        if args.max_rss_gb and peak_kb / 2**20 > args.max_rss_gb:
            why = f"stopped at {peak_kb / 2**20:.1f} GB RSS: over --max-rss-gb {args.max_rss_gb}"
        elif available_gb < args.min_free_gb:
            why = f"stopped at {peak_kb / 2**20:.1f} GB RSS: the machine had {available_gb:.1f} GB left"
        elif time.perf_counter() - start > args.timeout_s:
            why = f"over --timeout-s {args.timeout_s}"
        if why:
            child.kill()
            child.wait()
            return why, peak_kb / 2**20
        time.sleep(0.2)
    return (f"exit status {child.returncode}" if child.returncode else ""), peak_kb / 2**20


def source_files() -> dict[str, str]:
    """Where this process imported the model and training code from, with each file's sha256 (12 digits)."""
    import models.model
    import models.ssm
    import pipeline.backends
    import pipeline.train

    files = {}
    for module in (models.ssm, models.model, pipeline.train, pipeline.backends):
        with open(module.__file__, "rb") as f:
            files[module.__file__] = hashlib.sha256(f.read()).hexdigest()[:12]
    return files


def source_state() -> dict:
    """The commit, and the model files' hashes (other edits may be in the working tree when this runs)."""
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    files = {}
    for path in ("models/ssm.py", "models/model.py", "pipeline/train.py", "pipeline/backends.py"):
        with open(path, "rb") as f:
            files[path] = hashlib.sha256(f.read()).hexdigest()[:12]
    # GSS_BENCH_COMMIT: the commit a copy of the tree outside git (e.g. `git archive`) was made from
    return {"commit": git("rev-parse", "HEAD") or os.environ.get("GSS_BENCH_COMMIT", ""),
            "uncommitted": git("status", "--porcelain", "models", "pipeline"),
            "sha256": files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="gss,dss")
    parser.add_argument("--devices", default="1,4", help="CPU_NUM_DEVICES of each case")
    parser.add_argument("--precisions", default="fp32", help="fp32,bf16 (train.precision)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--length", type=int, default=4096, help="L: the model trains on rows of L+1 tokens")
    parser.add_argument("--batch", type=int, default=4, help="global batch in rows (divisible by every device count)")
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (the first compiles)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up")
    parser.add_argument("--timeout-s", type=float, default=3600, help="per case")
    parser.add_argument("--min-free-gb", type=float, default=2.0,
                        help="stop a case when the machine's MemAvailable falls below this")
    parser.add_argument("--max-rss-gb", type=float, default=None, help="stop a case whose RSS grows past this")
    parser.add_argument("--out", default=None)
    parser.add_argument("--update", action="store_true",
                        help="keep the cases of an existing --out that this run does not measure (e.g. to rerun some)")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # arch:devices:precision, in a child
    parser.add_argument("--case-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case:
        with open(args.case_out, "w") as f:
            json.dump(run_case(args), f)
        return

    rows, skipped, earlier = [], [], {}
    if args.update and args.out and os.path.exists(args.out):
        with open(args.out) as f:
            earlier = json.load(f)
    for precision in args.precisions.split(","):
        for arch in args.archs.split(","):
            for devices in map(int, args.devices.split(",")):
                if args.batch % devices:
                    raise SystemExit(f"--batch {args.batch} is not divisible by {devices} devices")
                case = f"{arch}:{devices}:{precision}"
                busy_before = cpu_busy(2.0)
                load_before = os.getloadavg()
                print(f"case {case}: cpu_busy before {busy_before:.0%}, load {load_before[0]:.2f}", flush=True)
                with tempfile.NamedTemporaryFile(suffix=".json") as out:
                    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": str(devices)}
                    argv = [sys.executable, "-m", "benchmarks.bench_xla_train", *sys.argv[1:], "--case", case,
                            "--case-out", out.name]
                    start = time.perf_counter()
                    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
                    why, peak_gb = watch(subprocess.Popen(argv, env=env), args)
                    if why:
                        skipped.append({"case": case, "why": why, "peak RSS sampled (GB)": peak_gb})
                        print(f"case {case} stopped: {why}", flush=True)
                        write(args, rows, skipped, earlier)
                        continue
                    with open(out.name) as f:
                        row = json.load(f)
                row.update({"started": started, "case wall (s)": time.perf_counter() - start,
                            "peak RSS sampled (GB)": peak_gb, "cpu_busy before": busy_before,
                            "loadavg before": load_before, "loadavg after": os.getloadavg()})
                rows.append(row)
                write(args, rows, skipped, earlier)
    busy_after = cpu_busy(2.0)
    write(args, rows, skipped, earlier, busy_after)
    print_table(rows, COLUMNS)
    for s in skipped:
        print(f"skipped {s['case']}: {s['why']}")


def write(args: argparse.Namespace, rows: list[dict], skipped: list[dict], earlier: dict,
          busy_after: float | None = None) -> None:
    """The JSON record so far to --out (after every case, so that a stopped run keeps what it measured); with
    --update, the cases of the earlier record that this run did not measure are kept (commands lists both)."""
    if not args.out:
        return
    command = " ".join(["PJRT_DEVICE=CPU", "python", "-m", "benchmarks.bench_xla_train", *sys.argv[1:]])
    done = {case_name(r) for r in rows} | {s["case"] for s in skipped}
    kept = [r for r in earlier.get("results", []) if case_name(r) not in done]
    kept_skipped = [s for s in earlier.get("skipped", []) if s["case"] not in done]
    commands = earlier.get("commands", [earlier["command"]] if "command" in earlier else [])
    from importlib.metadata import version  # not importing torch_xla here: the cases run beside this process

    record = {
        "commands": commands + [command],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"torch_xla CPU runtime (PJRT_DEVICE=CPU), {platform.processor() or platform.machine()}, "
                  f"{os.cpu_count()} cores, {read_kb('/proc/meminfo', 'MemTotal') / 2**20:.0f} GB RAM, "
                  f"torch {version('torch')}, torch_xla {version('torch_xla')}",
        "args": vars(args), "cpu_busy after": busy_after, "source": source_state(),
        "results": sorted(kept + rows, key=case_order), "skipped": kept_skipped + skipped,
    }
    if kept and earlier.get("source") != record["source"]:
        record["earlier source"] = earlier.get("source")
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
