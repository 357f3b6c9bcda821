"""CPU proxies of a training step's GPU cost, before and after (issue 32): the ATen ops and bytes of the eager step,
Inductor's kernels and bytes of the compiled one, peak memory and step time, for the models/ package of git revision
--before and the working tree's, side by side in one run.

Model: the paper preset of --arch (paper-gss, paper-dss, paper-gss-hybrid, paper-transformer: E=1024, F=4096, H=256,
N=512, vocab 32000) with --layers layers (default 2; the hybrid's attention every min(4, layers) layers, so that it
has one), --batch x --tokens tokens (default 1 x 4096). A step: forward, next-token loss, backward
(`_, loss = model(ids[:, :-1], ids[:, 1:]); loss.backward()`), in float32 or under CPU bf16 autocast (--dtype).
Per variant (column), in one process, variant after variant:
  eager     one step under a TorchDispatchMode and torch.profiler (profile_memory): every ATen op it dispatches;
            'moving data': all but views and allocations (about the kernels a GPU launches eager); bytes of an op:
            its distinct tensor inputs and outputs, each min(elements, storage) x element size; matmul: mm, addmm(_),
            bmm, baddbmm(_), matmul, linear and CPU flash attention, the rest (copy_, mul, add, _fft_r2c, ...)
            non-matmul; ops with a complex input or output counted apart as well.
  compiled  torch.compile (default mode, CPU Inductor, every cache off: a cold compile each time) of the model, one
            step: its forward and backward code (run_and_get_code). Kernels: calls of generated C++ kernels
            (cpp_fused_*); Inductor's metrics.generated_kernel_count counts each loop variant (vectorised, scalar,
            tail) apart, so more. Bytes: Inductor's estimate per scheduled node (metrics.nodes_num_elem, the reads and
            writes of its buffers, each once), split into generated kernels, matmuls (extern_kernels.*) and fallbacks
            (aten.* calls: ops Inductor has no code for); fallbacks on complex tensors: those of ops that have a
            complex input or output in the graphs Inductor compiles (seen by a post-grad pass that changes nothing).
            Graph breaks: dynamo's counter. First call: the compile plus one step.
  peak      the highest running total of the CPU allocator's allocations minus frees during one step (torch.profiler
            with profile_memory; eager the counted step, compiled the step after the first call): activations,
            gradients and temporaries, not the weights and inputs. Eager it matches ru_maxrss's rise over a first
            step (1311 vs 1315 MiB for gss fp32, once); compiled, ru_maxrss would hold the compiler's memory.
  time      median of --reps steps (fewer once they add up to --budget-s) after the profiled one.
GPU proxies: kernels and ops (launches), non-matmul bytes (memory-bound time: 1 GB is 0.3 ms at an H100's 3.35 TB/s),
peak memory. Matmul bytes only show that the matmuls stayed the same; CPU times are no GPU proxy.

    python -m benchmarks.bench_train_step --out benchmarks/results/train_step_cpu.json   # about 13 min on 2 cores
    python -m benchmarks.bench_train_step --arch dss --dtype bf16 --no-compile --variants after
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
import torch._inductor.compile_fx
from torch._dynamo.utils import counters
from torch._inductor import metrics
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.scheduler import ExternKernelSchedulerNode
from torch._inductor.utils import run_and_get_code
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import models
from benchmarks import common

PRESETS = {"gss": "paper-gss", "dss": "paper-dss", "hybrid": "paper-gss-hybrid", "transformer": "paper-transformer"}
MATMULS = frozenset({"mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_", "addbmm", "matmul", "linear",
                     "_scaled_dot_product_flash_attention_for_cpu",
                     "_scaled_dot_product_flash_attention_for_cpu_backward"})  # fmt: skip
NO_DATA = frozenset({"_unsafe_view", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"})
CALL = re.compile(r"^\s+(?:\w+ = )?((?:extern_kernels|torch\.ops\.aten|aten)\.[\w.]+)\(", re.MULTILINE)
KERNEL_CALL = re.compile(r"^\s+cpp_fused_\w+\(", re.MULTILINE)
GB, MIB = 1e9, 2.0**20
START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:5.0f} s] {message}", flush=True)


def op_name(call: str) -> str:
    """'extern_kernels.mm' / 'torch.ops.aten._fft_r2c.default' / 'aten.scatter_reduce_.two' -> 'mm' / '_fft_r2c' /
    'scatter_reduce_'."""
    parts = call.removeprefix("torch.ops.").split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes an op touches in t: its elements, or its storage's if fewer (a broadcast view)."""
    size = t.element_size()
    return min(t.numel(), t.untyped_storage().nbytes() // size) * size


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched under it and the bytes of their tensors (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = Counter()  # "all", "moving data", "complex"
        self.bytes = Counter()  # "matmul", "non-matmul", "complex"
        self.by_op: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # non-matmul op -> [calls, bytes]
        self.complex_ops: set[str] = set()

    def __torch_dispatch__(self, func: torch._ops.OpOverload, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:  # fmt: skip
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        tensors = {id(t): t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)}.values()
        is_complex = any(t.is_complex() for t in tensors)
        self.ops["all"] += 1
        if is_complex:
            self.ops["complex"] += 1
            self.complex_ops.add(name)
        if func.is_view or name in NO_DATA:
            return out
        moved = sum(tensor_bytes(t) for t in tensors)
        self.ops["moving data"] += 1
        self.bytes["complex"] += moved if is_complex else 0
        if name in MATMULS:
            self.bytes["matmul"] += moved
        else:
            self.bytes["non-matmul"] += moved
            self.by_op[name][0] += 1
            self.by_op[name][1] += moved
        return out


class ComplexOps(CustomGraphPass):
    """A post-grad pass that changes nothing: records the ops with a complex input or output in the graphs Inductor
    compiles (it generates no code for complex tensors: they are fallbacks)."""

    def __init__(self) -> None:
        self.ops: set[str] = set()

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in graph.nodes:
            if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
                continue
            values = tree_leaves([node.meta.get("val"), *(arg.meta.get("val") for arg in node.all_input_nodes)])
            if any(isinstance(v, torch.Tensor) and v.is_complex() for v in values):
                self.ops.add(node.target.overloadpacket.__name__)

    def uuid(self) -> None:
        return None


def eager_costs(step: Callable[[], None], top: int) -> dict[str, Any]:
    """Ops, bytes and peak memory of one eager step."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        with OpCounter() as counter:
            step()
    ranked = sorted(counter.by_op.items(), key=lambda item: item[1][1], reverse=True)
    return {
        "ATen ops": counter.ops["all"], "ATen ops moving data": counter.ops["moving data"],
        "ATen ops on complex tensors": counter.ops["complex"], "non-matmul GB": counter.bytes["non-matmul"] / GB,
        "complex-tensor GB": counter.bytes["complex"] / GB, "matmul GB": counter.bytes["matmul"] / GB,
        "peak MiB": common.peak_bytes(prof) / MIB, "ops on complex tensors": sorted(counter.complex_ops),
        "top non-matmul ops": [{"op": op, "calls": calls, "GB": moved / GB} for op, (calls, moved) in ranked[:top]],
    }  # fmt: skip


def inductor_bytes() -> dict[str, float]:
    """Inductor's bytes of the nodes compiled since metrics.reset(), by kind (nodes_num_elem holds bytes // 4)."""
    moved = Counter()
    for node, quarter_bytes in metrics.nodes_num_elem:
        if isinstance(node, ExternKernelSchedulerNode):
            kind = "matmul" if op_name(getattr(node.node, "python_kernel_name", None) or "") in MATMULS else "fallback"
        else:
            kind = "kernel"
        moved[kind] += 4 * quarter_bytes
    return {f"{kind} GB": moved[kind] / GB for kind in ("kernel", "fallback", "matmul")}


def compiled_costs(step: Callable[[], None]) -> dict[str, Any]:
    """Compile (cold) and run one step; Inductor's kernels, bytes and fallbacks, dynamo's graph breaks."""
    metrics.reset()
    counters.clear()
    complex_ops = ComplexOps()
    start = time.perf_counter()
    with torch._inductor.config.patch(post_grad_custom_post_pass=complex_ops):
        _, code = run_and_get_code(step)  # resets dynamo first
    first_call = time.perf_counter() - start
    source = "\n".join(code)
    calls = Counter(op_name(call) for call in CALL.findall(source))
    fallbacks = {op: n for op, n in calls.items() if op not in MATMULS}
    on_complex = {op: n for op, n in fallbacks.items() if op in complex_ops.ops}
    return {
        "first call s": first_call, "graphs": counters["stats"]["unique_graphs"],
        "graph breaks": sum(counters["graph_break"].values()), "kernels": len(KERNEL_CALL.findall(source)),
        "generated_kernel_count": metrics.generated_kernel_count, "GB": metrics.num_bytes_accessed / GB,
        **inductor_bytes(), "matmul calls": sum(calls[op] for op in calls if op in MATMULS),
        "fallback calls": sum(fallbacks.values()), "fallback calls on complex tensors": sum(on_complex.values()),
        "calls": dict(calls.most_common()), "fallbacks on complex tensors": on_complex,
    }  # fmt: skip


def build(package: ModuleType, args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model of --arch/--layers from `package`, seeded, and the step's tokens."""
    cfg = package.PRESETS[PRESETS[args.arch]]
    cfg = dataclasses.replace(cfg, n_layers=args.layers, attn_every=min(cfg.attn_every, args.layers))
    torch.manual_seed(args.seed)
    model = package.build_model(cfg).to(device)
    return model, common.random_tokens(cfg, args.batch, args.tokens + 1, device)


def measure_variant(name: str, package: ModuleType, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Eager then compiled costs and times of one variant."""
    log(f"{name}: building the model")
    model, ids = build(package, args, device)
    result: dict[str, Any] = {}
    step = common.train_step(model, ids, args)
    log(f"{name} eager: one step counting ATen ops and profiling memory")
    result["eager"] = eager_costs(step, args.top)
    if not args.no_time:
        log(f"{name} eager: timing up to {args.reps} steps")
        result["eager"]["step s"] = common.measure(step, device, args.warmup, args.reps, args.budget_s).median_s
    if args.no_compile:
        return result
    log(f"{name} compiled: compiling forward + backward and running one step (minutes)")
    step = common.train_step(torch.compile(model), ids, args)
    result["compiled"] = compiled_costs(step)
    log(f"{name} compiled: {result['compiled']['first call s']:.0f} s; one step profiling memory")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    result["compiled"]["peak MiB"] = common.peak_bytes(prof) / MIB
    if not args.no_time:
        log(f"{name} compiled: timing up to {args.reps} steps")
        result["compiled"]["step s"] = common.measure(step, device, args.warmup, args.reps, args.budget_s).median_s
    return result


SUMMARY = {
    "eager": ["ATen ops", "ATen ops moving data", "ATen ops on complex tensors", "non-matmul GB", "complex-tensor GB",
              "matmul GB", "peak MiB", "step s"],
    "compiled": ["kernels", "generated_kernel_count", "kernel GB", "fallback GB", "matmul GB", "matmul calls",
                 "fallback calls", "fallback calls on complex tensors", "graphs", "graph breaks", "peak MiB",
                 "step s", "first call s"],
}  # fmt: skip


def summary(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows metric | each variant | after/before (where both have the figure)."""
    rows = []
    for mode, keys in SUMMARY.items():
        for key in keys:
            row: dict[str, Any] = {"metric": f"{mode}: {key}"}
            for variant, result in results.items():
                row[variant] = result.get(mode, {}).get(key)
            if row.get("before") and row.get("after") is not None:
                row["after/before"] = row["after"] / row["before"]
            if any(row.get(variant) is not None for variant in results):
                rows.append(row)
    return rows


def top_ops(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The union of each variant's top non-matmul eager ops: calls and GB per variant."""
    table: dict[str, dict[str, Any]] = defaultdict(dict)
    for variant, result in results.items():
        for entry in result["eager"]["top non-matmul ops"]:
            table[entry["op"]].update({f"{variant} calls": entry["calls"], f"{variant} GB": entry["GB"]})
    rows = [{"op": op, **values} for op, values in table.items()]
    return sorted(rows, key=lambda row: max(row.get(f"{v} GB") or 0 for v in results), reverse=True)


def extern_calls(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Calls of the compiled code into ATen (matmuls and fallbacks) per op and variant; '*': on complex tensors."""
    table: dict[str, dict[str, Any]] = defaultdict(dict)
    for variant, result in results.items():
        compiled = result.get("compiled", {})
        for op, n in compiled.get("calls", {}).items():
            table[op + (" *" if op in compiled["fallbacks on complex tensors"] else "")][variant] = n
    return [{"op": op, **values} for op, values in table.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(PRESETS), default="gss", help="paper preset of this architecture")
    parser.add_argument("--layers", type=int, default=2, help="n_layers of the preset")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per row")
    parser.add_argument("--variants", type=lambda text: text.split(","), default="before,after",
                        help="before (models/ at git revision --before), after (the working tree's models/)")
    parser.add_argument("--before", default="da38185", help="git revision of the 'before' variant")
    parser.add_argument("--no-compile", action="store_true", help="eager figures only")
    parser.add_argument("--no-time", action="store_true", help="counts and memory only, no timed steps")
    parser.add_argument("--top", type=int, default=8, help="non-matmul eager ops listed per variant")
    common.add_common_args(parser, reps=3, budget_s=60.0)
    parser.set_defaults(warmup=0)  # the profiled step before the timed ones warms up
    args = parser.parse_args()
    if not set(args.variants) <= {"before", "after"}:
        parser.error(f"--variants {','.join(args.variants)}: before, after or both")
    device = common.setup(args)
    if device.type != "cpu":
        parser.error("--device: these are CPU proxies, cpu only")
    torch._inductor.config.force_disable_caches = True  # a fresh compile: its code, metrics and time
    metrics_log = torch._inductor.compile_fx.inductor_metrics_log  # Inductor counts bytes only when it is on
    metrics_log.setLevel(logging.INFO)
    metrics_log.propagate = False
    metrics_log.addHandler(logging.NullHandler())

    log(f"{args.arch}, {args.layers} layers, {args.batch} x {args.tokens} tokens, {args.dtype}, "
        f"{common.describe(device)}")  # fmt: skip
    results: dict[str, dict[str, Any]] = {}
    for variant in args.variants:
        package = models if variant == "after" else common.models_at(args.before)
        if package is not None:
            results[variant] = measure_variant(variant, package, args, device)

    print(f"\nOne training step (fwd + bwd), {args.arch} {args.layers} layers at paper width, {args.batch} x "
          f"{args.tokens} tokens, {args.dtype}; before = {args.before}, after = working tree; "
          f"{common.describe(device)}\n")  # fmt: skip
    rows = summary(results)
    common.print_table(rows, ["metric", *results, *(["after/before"] if {"before", "after"} <= results.keys() else [])])
    print(f"The eager step's top {args.top} non-matmul ops by bytes, per variant\n")
    ops = top_ops(results)
    common.print_table(ops, ["op", *(f"{v} {k}" for v in results for k in ("calls", "GB"))])
    calls = extern_calls(results)
    if calls:
        print("ATen calls of the compiled code (* = on complex tensors)\n")
        common.print_table(calls, ["op", *results])
    common.write_json(args, device, {"summary": rows, "eager top non-matmul ops": ops, "compiled ATen calls": calls,
                                     "variants": [{"variant": v, **r} for v, r in results.items()]})  # fmt: skip


if __name__ == "__main__":
    main()
