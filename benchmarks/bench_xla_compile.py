"""Graph size and compile time of the chunked SSM kernel under PyTorch/XLA, by sequence length.

One forward + backward of a models.ssm.DiagonalSSM (H=256 channels as inside the paper's GSS layer,
N=512 modes, chunk 128, batch 1, kernel "chunked") is traced lazily on the XLA device, then:

  * IR nodes:      lines of torch_xla's lazy IR for the pass (`_get_xla_tensors_text`),
  * HLO ops:       instructions in the lowered HLO module (`_get_xla_tensors_hlo`), all computations,
  * trace (s):     Python time to record the forward and backward (an unrolled loop costs here too),
  * aten fallbacks: ops that ran on the host instead of through XLA while tracing (should be 0),
  * compile (s):   the `CompileTime` metric of compiling that graph (`_xla_warm_up_cache`: compiled,
                   not run, so long lengths need no memory for activations); lengths above
                   --compile-max are not compiled,
  * peak RSS (GB): the process's peak resident memory so far (ru_maxrss), i.e. up to this compile,
  * execute (ms):  with --execute, the median time of running the compiled graph (--reps times,
                   after one untimed run).

--ssm-file runs another version of models/ssm.py, e.g. the one before a change:

    git show 8d12870:models/ssm.py > /tmp/ssm_before.py
    PJRT_DEVICE=CPU .venv-xla/bin/python -m benchmarks.bench_xla_compile --ssm-file /tmp/ssm_before.py
"""

from __future__ import annotations

import argparse
import re
import resource
import statistics
import time
from types import ModuleType

import torch
import torch_xla
import torch_xla.debug.metrics as metrics

from benchmarks import common
from benchmarks.bench_kernels import load_ssm, ssm_input_shape

HLO_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?[\w.\-]+\s*=", re.MULTILINE)


def trace_pass(ssm: ModuleType, args: argparse.Namespace, length: int, device: torch.device) -> list[torch.Tensor]:
    """Record one forward + backward lazily; return the tensors a training step would materialise."""
    layer = ssm.DiagonalSSM(args.channels, args.state_size, "chunked", args.chunk).to(device)
    u = torch.randn(ssm_input_shape(ssm, args.channels, length)).to(device).requires_grad_()
    grad = torch.randn_like(u)
    y, _ = layer(u)
    loss = (y * grad).sum()
    loss.backward()
    return [loss, u.grad, *(p.grad for p in layer.parameters())]


def compile_seconds() -> float:
    """Total of the CompileTime metric since the last clear (nanoseconds in torch_xla)."""
    data = metrics.metric_data("CompileTime")
    return data[1] / 1e9 if data else 0.0


def measure(ssm: ModuleType, args: argparse.Namespace, length: int, device: torch.device) -> dict:
    metrics.clear_all()
    start = time.perf_counter()
    tensors = trace_pass(ssm, args, length, device)
    trace_s = time.perf_counter() - start
    fallbacks = sum(metrics.counter_value(name) for name in metrics.counter_names() if name.startswith("aten::"))
    ir = torch_xla._XLAC._get_xla_tensors_text(tensors)
    hlo = torch_xla._XLAC._get_xla_tensors_hlo(tensors)
    row = {
        "L": length,
        "chunks": length // args.chunk,
        "IR nodes": sum(1 for line in ir.splitlines() if " = " in line),
        "HLO ops": len(HLO_INSTRUCTION.findall(hlo)),
        "trace (s)": trace_s,
        "aten fallbacks": fallbacks,
    }
    if args.compile_max is not None and length > args.compile_max:
        return row
    metrics.clear_all()
    torch_xla._XLAC._xla_warm_up_cache(tensors, [])
    row["compile (s)"] = compile_seconds()
    row["peak RSS (GB)"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if args.execute:
        times = []
        for _ in range(1 + args.reps):  # the first run may compile again (other outputs): not timed
            tensors = trace_pass(ssm, args, length, device)
            start = time.perf_counter()
            torch_xla.sync()
            torch_xla._XLAC._xla_wait_device_ops([])
            times.append(time.perf_counter() - start)
        row["execute (ms)"] = statistics.median(times[1:]) * 1e3
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=common.int_list, default="4k,64k")
    parser.add_argument("--channels", type=int, default=256, help="H")
    parser.add_argument("--state-size", type=int, default=512, help="N")
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--ssm-file", default=None, help="a copy of models/ssm.py to measure instead")
    parser.add_argument("--compile-max", type=common.int_list, default=None, help="longer L: graph size only")
    parser.add_argument("--execute", action="store_true", help="also run the compiled graph")
    parser.add_argument("--reps", type=int, default=3, help="runs of the graph with --execute")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the results as JSON to this path")
    args = parser.parse_args()
    args.compile_max = args.compile_max[0] if args.compile_max else None
    args.torch_xla = torch_xla.__version__
    torch.manual_seed(args.seed)
    args.cpu_busy_at_start = common.cpu_busy()
    device = torch_xla.device()
    ssm = load_ssm(args.ssm_file)
    print(f"torch_xla {torch_xla.__version__}, {device}, {args.ssm_file or 'models/ssm.py'}")

    rows = []
    for length in args.lengths:
        rows.append(measure(ssm, args, length, device))
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    print(f"\nDiagonalSSM H={args.channels} N={args.state_size} chunk {args.chunk}, batch 1, forward + backward\n")
    common.print_table(rows, list(max(rows, key=len)))
    common.write_json(args, torch.device("cpu"), {"xla_compile": rows})


if __name__ == "__main__":
    main()
