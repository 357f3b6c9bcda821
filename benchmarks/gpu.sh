#!/usr/bin/env bash
# The GPU benchmarks in one command, on one H100 or H200, in under 8 minutes; JSON (and a log) into OUT_DIR:
#
#   benchmarks/gpu.sh OUT_DIR
#
#   presets.json      train steps of paper-gss, paper-dss, paper-gss-hybrid, paper-transformer at 8 x 4096, bf16,
#                     compiled (the path `gss train` takes on cuda): tokens/s and MFU (model FLOPs: BENCHMARKS.md,
#                     "Model FLOPs per token"); targets: GSS >= 50% MFU, DSS >= 40%, hybrid and Transformer >= 45%
#   presets_64k.json  the same for paper-gss and paper-transformer at 1 x 65536: GSS >= 90% of its 4k tokens/s
#                     and >= 3x the Transformer's
#   ssm_kernels.json  the SSM layer's fwd+bwd, fft against chunked (128, 256), L = 4k..64k
#   dss_kernel.json   DSS's kernel and layer with its learned step per channel against Delta = 1 at 4k (fwd+bwd)
#                     and 64k (fwd): ms and peak memory
#   decoding.json     recurrent decoding ms/token of paper-gss at 1k..64k context, against recomputing
#   generate.json     paper-gss `generate` at batch 1 and 64: eager against the fast step (compiled, CUDA graph),
#                     fp32 and bf16 weights; greedy tokens fast = eager in fp32, bf16 logits against fp32's
#                     (targets: <= 0.5 ms/token at batch 1, >= 64k tokens/s at batch 64)
#   fsdp.json         a 2-step FSDP2 run of paper-gss through the worker's code, a sharded checkpoint, a restore
#
# PYTHON picks the interpreter (default: .venv/bin/python if there, else python3); PEAK_TFLOPS the dense bf16
# peak for MFU (default 989, H100 SXM; the H200 has the same). Fails, and writes nothing, without CUDA.
set -euo pipefail
out=${1:?usage: benchmarks/gpu.sh OUT_DIR}
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
peak=${PEAK_TFLOPS:-989}
"$PYTHON" -c '
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"benchmarks/gpu.sh: no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
             "run it on a GPU node with a CUDA build of torch")
print(torch.cuda.get_device_name(), "torch", torch.__version__)'
mkdir -p "$out"
export PYTHONUNBUFFERED=1
bench() { echo "== $*"; "$PYTHON" -m "$@"; }
{
  bench benchmarks.bench_presets --device cuda --dtype bf16 --compile --length 4096 --batch 8 --reps 10 \
    --peak-tflops "$peak" --out "$out/presets.json"
  bench benchmarks.bench_presets --device cuda --dtype bf16 --compile --length 65536 --batch 1 --reps 5 \
    --presets paper-gss,paper-transformer --peak-tflops "$peak" --out "$out/presets_64k.json"
  bench benchmarks.bench_kernels --device cuda --part ssm --ssm-lengths 4k,8k,16k,32k,64k --fwd-bwd-max 64k \
    --chunks 128,256 --reps 10 --out "$out/ssm_kernels.json"
  bench benchmarks.bench_dss_kernel --device cuda --reps 10 --out "$out/dss_kernel.json"
  bench benchmarks.bench_decoding --device cuda --dtype bf16 --preset paper-gss --contexts 1k,4k,16k,64k \
    --step-reps 100 --peak-tflops "$peak" --out "$out/decoding.json"
  bench benchmarks.bench_generate --device cuda --presets paper-gss --batches 1,64 --steps 64 --reps 3 \
    --before "" --out "$out/generate.json"
  bench benchmarks.bench_fsdp --device cuda --dtype bf16 --preset paper-gss --steps 2 --out "$out/fsdp.json"
} 2>&1 | tee "$out/gpu.log"
