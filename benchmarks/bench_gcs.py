"""Each `gss` command's wall time with everything on gs:// (a local GCS server, tests/gcs.py) beside local paths.

The same commands, as a user runs them (one process each, its own local Ray cluster), on the same corpus and
config (configs/local.yaml's small GSS, shortened by the flags below):

    local: data.source.path=<a folder>         root=<a folder>
    gs://: data.source.path=gs://corpus/pg19   root=gs://runs/bench   (the corpus read anonymously)

The MLflow tracking store is a local sqlite file in both (a bucket cannot hold it). The corpus is the PG-19
sample of ../shared/corpora, else a generated one. The server runs on this machine, so the gs:// column
measures the GCS client path (gcsfs, pyarrow's fsspec wrapper for Ray Train, google-cloud-storage for MLflow)
and not a network: real GCS adds each request's round trip.

    python -m benchmarks.bench_gcs --out benchmarks/results/gcs_cpu.json
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from benchmarks.common import print_table, write_json
from tests.corpus import fresh_process_env, write_pg19
from tests.gcs import LocalGCS

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "corpora" / "pg19"
COMMANDS = [["prepare"], ["train"], ["eval"], ["compare"], ["generate", "--max-new-tokens", "64"]]


def run_commands(config: Path, env: dict[str, str], cwd: Path) -> dict[str, float]:
    seconds = {}
    for command in COMMANDS:
        start = time.perf_counter()
        job = subprocess.run([sys.executable, "-m", "jobs.cli", command[0], str(config), *command[1:]], env=env,
                             cwd=cwd, capture_output=True, text=True)
        if job.returncode != 0:
            sys.exit(f"gss {command[0]} failed:\n{(job.stdout + job.stderr)[-3000:]}")
        seconds[command[0]] = time.perf_counter() - start
        print(f"  gss {command[0]}: {seconds[command[0]]:.1f} s", flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-gcs-"))
    corpus = SHARED if SHARED.is_dir() else work / "corpus"
    if not SHARED.is_dir():
        write_pg19(corpus, counts=(20, 2, 2), words=(20_000, 40_000))
    gcs = LocalGCS(work / "gcs").start()
    fs = gcs.filesystem()
    fs.mkdir("corpus")
    fs.mkdir("runs")
    for path in sorted(corpus.rglob("*.txt")):
        fs.pipe_file(f"corpus/pg19/{path.relative_to(corpus)}", path.read_bytes())

    base = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    base["train"] |= {"steps": args.steps, "checkpoint_every": args.steps // 2, "eval_every": args.steps}
    base["eval"] |= {"during_training": 0}
    env = fresh_process_env(**gcs.env)
    rows = []
    for where, source, root in [("local", {"path": str(corpus)}, str(work / "local")),
                                ("gs://", {"path": "gs://corpus/pg19", "storage_options": {"token": "anon"}},
                                 "gs://runs/bench")]:
        config = work / f"{where.strip(':/')}.yaml"
        tree = base | {"root": root, "tracking": {"uri": f"sqlite:///{work / where.strip(':/')}.db"}}
        tree["data"] = base["data"] | {"source": base["data"]["source"] | source}
        config.write_text(yaml.safe_dump(tree))
        print(where, flush=True)
        rows.append({"where": where, **{k: round(v, 1) for k, v in run_commands(config, env, work).items()}})
    gcs.stop()
    rows.append({"where": "gs:// / local", **{c[0]: round(rows[1][c[0]] / rows[0][c[0]], 2) for c in COMMANDS}})
    print(f"\n{args.steps} training steps, corpus {corpus}\n")
    print_table(rows, ["where", *(c[0] for c in COMMANDS)])
    write_json(args, torch.device("cpu"), {"seconds": rows})


if __name__ == "__main__":
    main()
