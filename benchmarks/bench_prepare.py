"""Tokens/s of the whole `gss prepare` job against a single-process loop of raw SentencePiece encoding.

The corpus is the PG-19 sample of ../shared/corpora, copied `--copies` times (distinct file names) so
the job runs long enough to measure; the tokenizer is trained once beforehand and given to the job, so
both sides encode with the same model. The floor: `sp.encode(text)` over every document in one process,
texts already in memory. The ceiling: one forked process per core, each encoding an equal share. The job:
`prepare()` on a running local Ray cluster (read, tokenize with the actor pool, pack, write zstd Parquet,
manifest), and once cold through `gss prepare`, Ray start included.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import cpu_busy, print_table, write_json
from pipeline.config import TokenizerConfig, load_config
from pipeline.prepare import prepare
from pipeline.tokenizer import Tokenizer, train_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "pg19"


def build_corpus(src: Path, dst: Path, copies: int) -> list[Path]:
    files = []
    for split in ("train", "validation", "test"):
        (dst / split).mkdir(parents=True)
        for path in sorted((src / split).glob("*.txt")):
            for k in range(copies):
                target = dst / split / f"{path.stem}-{k}.txt"
                shutil.copyfile(path, target)
                files.append(target)
    return sorted(files)


def _encode_share(model: bytes, texts: list[str], barrier, results, rank: int) -> None:
    sp = Tokenizer(model).sp
    barrier.wait()
    t = time.perf_counter()
    for text in texts:
        sp.encode(text)
    results[rank] = time.perf_counter() - t


def parallel_encode_seconds(model: bytes, texts: list[str], processes: int) -> float:
    """The hardware ceiling: `processes` forked processes each encode an equal share, no Ray, no I/O."""
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(processes), ctx.Array("d", processes)
    shares = [texts[i::processes] for i in range(processes)]
    procs = [ctx.Process(target=_encode_share, args=(model, shares[i], barrier, results, i)) for i in range(processes)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return max(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=str(SHARED), help="a PG-19 layout folder")
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--unit-mb", type=int, default=32, help="data.source.unit_bytes in MiB")
    parser.add_argument("--out")
    args = parser.parse_args()
    busy = cpu_busy()
    if busy and busy > 0.1:
        print(f"warning: the CPU is {busy:.0%} busy before starting; timings will be off")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = build_corpus(Path(args.corpus), tmp / "corpus", args.copies)
        texts = [p.read_text() for p in files]
        mb = sum(len(t.encode()) for t in texts) / 1e6
        print(f"corpus: {len(files)} files, {mb:.0f} MB; training a {args.vocab} tokenizer on 20 MB of it")
        model = train_tokenizer(texts[: max(1, len(texts) * 20 // int(mb + 1))], TokenizerConfig(vocab_size=args.vocab))
        (tmp / "tok.model").write_bytes(model)
        sp = Tokenizer(model).sp

        floor = []
        for _ in range(args.reps):
            t = time.perf_counter()
            tokens = sum(len(sp.encode(text)) for text in texts)
            floor.append(time.perf_counter() - t)
        tokens += len(texts)  # the job also writes one end-of-document id per document
        ceiling = statistics.median(parallel_encode_seconds(model, texts, os.cpu_count()) for _ in range(args.reps))

        overrides = [f"data.source.path={tmp / 'corpus'}", f"data.tokenizer.path={tmp / 'tok.model'}",
                     f"data.source.unit_bytes={args.unit_mb << 20}", "data.pack.seq_len=4096"]
        import ray

        from pipeline.cluster import connect

        connect(load_config(None, []).ray)
        runs = []
        for rep in range(args.reps):
            manifest = prepare(load_config(None, [f"root={tmp / f'warm{rep}'}", *overrides]))
            assert sum(s["tokens"] for s in manifest["splits"].values()) == tokens
            runs.append(manifest["stats"])
        ray.shutdown()

        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "jobs.cli", "prepare", f"root={tmp / 'cold'}", *overrides],
                       check=True, capture_output=True)
        cold = time.perf_counter() - t

    floor_s = statistics.median(floor)
    warm_s = statistics.median(r["seconds"] for r in runs)
    stages = {k: statistics.median(r["stage_seconds"][k] for r in runs) for k in runs[0]["stage_seconds"]}
    rows = [
        {"what": "single process, sp.encode loop (floor)", "seconds": floor_s, "tokens/s": tokens / floor_s,
         "vs floor": 1.0},
        {"what": f"{os.cpu_count()} processes, each encoding a share (hardware ceiling)", "seconds": ceiling,
         "tokens/s": tokens / ceiling, "vs floor": floor_s / ceiling},
        {"what": "gss prepare, running Ray cluster", "seconds": warm_s, "tokens/s": tokens / warm_s,
         "vs floor": floor_s / warm_s},
        {"what": "gss prepare, cold (Ray start included)", "seconds": cold, "tokens/s": tokens / cold,
         "vs floor": floor_s / cold},
    ]
    print(f"\n{tokens:,} tokens, {mb:.0f} MB, {torch.get_num_threads()} cores\n")
    print_table(rows, ["what", "seconds", "tokens/s", "vs floor"])
    print_table([{"stage": k, "seconds": v} for k, v in stages.items()], ["stage", "seconds"])
    write_json(args, torch.device("cpu"), {"rows": rows, "stages": [stages], "tokens": [{"tokens": tokens}]})


if __name__ == "__main__":
    main()
