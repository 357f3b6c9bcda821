"""Training throughput of `gss train` (Ray Train): tokens/s and model FLOPs utilisation.

Prepares the PG-19 sample of ../shared/corpora (or a corpus given with --corpus) once, then trains each
preset for --steps steps on 1..N workers of the chosen backend and reads tokens/s back from the MLflow
run (the median over the logged intervals after the first, which includes start-up and compilation).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import mlflow
import torch

from benchmarks.common import flops_per_token, mfu, print_table, write_json
from models import build_model
from pipeline.config import load_config, model_config
from pipeline.dataset import dataset_dir, load_manifest
from pipeline.prepare import prepare
from pipeline.train import train_stage

SHARED = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "pg19"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=str(SHARED), help="a PG-19 layout folder")
    parser.add_argument("--presets", default="small-gss,small-transformer")
    parser.add_argument("--workers", default="1,2", help="worker counts to run")
    parser.add_argument("--backend", default="cpu", choices=["cpu", "cuda", "xla"])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--global-batch-tokens", type=int, default=16384)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--peak-tflops", type=float, help="peak TFLOP/s of one device, for MFU")
    parser.add_argument("--root", help="where to write (default: a temporary folder)")
    parser.add_argument("--out")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or tmp
        base = [f"root={root}", f"data.source.path={args.corpus}", f"data.tokenizer.vocab_size={args.vocab}",
                "data.tokenizer.sample_bytes=20000000", f"data.pack.seq_len={args.seq_len}"]
        prepare(load_config(None, base))
        rows = []
        for preset in args.presets.split(","):
            for workers in map(int, args.workers.split(",")):
                name = f"bench-{preset}-{args.backend}-{workers}w"
                cfg = load_config(None, [*base, f"name={name}", f"train.preset={preset}",
                                         f"train.backend={args.backend}", f"train.num_workers={workers}",
                                         f"train.steps={args.steps}", f"train.precision={args.precision}",
                                         f"train.global_batch_tokens={args.global_batch_tokens}",
                                         f"train.micro_batch={args.micro_batch}", "train.log_every=5",
                                         f"train.eval_every={args.steps}", f"train.checkpoint_every={args.steps}"])
                out = train_stage(cfg)
                history = mlflow.MlflowClient().get_metric_history(out["run_id"], "tokens_per_second")
                tokens_s = statistics.median(m.value for m in sorted(history, key=lambda m: m.step)[1:])
                model_cfg = model_config(cfg, load_manifest(dataset_dir(cfg))["tokenizer"]["vocab_size"])
                with torch.device("meta"):
                    model = build_model(model_cfg)
                flops = flops_per_token(model, args.seq_len, batch=args.micro_batch)
                per_device = tokens_s / workers
                rows.append({"preset": preset, "workers": workers, "params (M)": model.num_parameters() / 1e6,
                             "tokens/s": tokens_s, "tokens/s per worker": per_device,
                             "TFLOP/s per worker": flops * per_device / 1e12,
                             "MFU": mfu(flops, per_device, args.peak_tflops)})
    print_table(rows, ["preset", "workers", "params (M)", "tokens/s", "tokens/s per worker", "TFLOP/s per worker",
                       "MFU"])
    write_json(args, torch.device(args.backend if args.backend != "xla" else "cpu"), {"rows": rows})


if __name__ == "__main__":
    main()
