"""Evaluation throughput: `gss eval`'s Scorer actors on the local Ray cluster against scoring in one process.

Prepares the PG-19 sample of ../shared/corpora (or --corpus) once, builds the --preset model (random weights:
speed does not depend on them) with the tokenizer's vocabulary, and scores the test split at each length:
  * one process: `score_documents` in this process, torch's default threads (the path before issue 14);
  * cluster, N actors: `evaluate` with eval.num_workers=N on a local cluster of --cpus CPUs, one CPU per actor.
tokens/s = tokens scored ÷ wall seconds (actor start-up included), per length.

    python -m benchmarks.bench_eval --lengths 256,2048 --actors 1,2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import int_list, print_table, write_json
from models import build_model
from pipeline.cluster import connect
from pipeline.config import load_config, model_config
from pipeline.dataset import dataset_dir, eval_documents, load_manifest
from pipeline.evaluate import LoadedModel, evaluate, score_documents
from pipeline.prepare import prepare

SHARED = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "pg19"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=str(SHARED), help="a PG-19 layout folder")
    parser.add_argument("--preset", default="small-gss")
    parser.add_argument("--lengths", type=int_list, default="256,2048")
    parser.add_argument("--actors", default="1,2", help="actor counts to run")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--max-documents", type=int, default=3, help="test documents scored")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch-tokens", type=int, default=16384)
    parser.add_argument("--piece-tokens", type=int, default=2048)
    parser.add_argument("--out")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as root:
        base = [f"root={root}", f"data.source.path={args.corpus}", f"data.tokenizer.vocab_size={args.vocab}",
                "data.tokenizer.sample_bytes=20000000", "data.pack.seq_len=1024", f"train.preset={args.preset}",
                f"ray.num_cpus={args.cpus}", "eval.splits=[test]", f"eval.max_documents={args.max_documents}",
                f"eval.batch_tokens={args.batch_tokens}", f"eval.piece_tokens={args.piece_tokens}", "eval.device=cpu"]
        cfg = load_config(None, base)
        connect(cfg.ray)
        prepare(cfg)
        manifest = load_manifest(dataset_dir(cfg))
        torch.manual_seed(0)
        model = build_model(model_config(cfg, manifest["tokenizer"]["vocab_size"])).eval()
        docs = [d["tokens"] for d in eval_documents(dataset_dir(cfg), "test", limit=args.max_documents)]
        tokens = sum(map(len, docs))
        rows = []
        for length in args.lengths:
            row = {"length": length, "tokens": tokens}
            started = time.perf_counter()
            score_documents(model, docs, length, manifest["tokenizer"]["eod_id"], args.piece_tokens,
                            args.batch_tokens, torch.device("cpu"))
            row["one process (tokens/s)"] = tokens / (time.perf_counter() - started)
            for actors in map(int, args.actors.split(",")):
                run = load_config(None, [*base, f"eval.lengths=[{length}]", f"eval.num_workers={actors}"])
                started = time.perf_counter()
                evaluate(run, LoadedModel(model, "bench"))
                row[f"{actors} actor(s) (tokens/s)"] = tokens / (time.perf_counter() - started)
            first, last = args.actors.split(",")[0], args.actors.split(",")[-1]
            row[f"{last} / {first} actors"] = row[f"{last} actor(s) (tokens/s)"] / row[f"{first} actor(s) (tokens/s)"]
            rows.append(row)
            print(row, flush=True)
    print(f"\n{args.preset} ({model.num_parameters() / 1e6:.1f}M parameters), {args.max_documents} test documents, "
          f"batch_tokens {args.batch_tokens}, piece_tokens {args.piece_tokens}, {args.cpus} CPUs\n")
    print_table(rows, list(rows[0]))
    write_json(args, torch.device("cpu"), {"eval": rows})


if __name__ == "__main__":
    main()
