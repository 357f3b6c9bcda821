"""`gss prepare`: raw corpus -> SentencePiece tokenizer -> tokenized, packed Parquet shards.

What it writes, and how the other stages read it, is `pipeline.dataset`. Stages, each a Ray Data job over
work items that are done at most once:

1. tokenizer: sample training documents (a hash of their name decides, so any partitioning samples
   the same ones) and train SentencePiece; or copy the one given.
2. tokenize and pack, in one pass: units of the corpus go to an actor pool that holds the SentencePiece
   processor; each unit becomes its own shard, written by the actor, and a JSON sidecar written last.
   A training unit's full rows (seq_len + 1 tokens, overlapping by one) make its shard; the rest, from
   the last full row's last token on (its tail), goes to `_work/`.
3. tails: the driver packs the tails, in unit order, into the last training shard (at most one row's
   inputs per unit, so small). The tails stay in `_work/tails/` once the dataset is complete.

A re-run skips every unit whose sidecar exists, so an interrupted job resumes with no duplicates and
no gaps, and its output is byte for byte that of an uninterrupted run. A different data config is a
different fingerprint, hence a new folder beside the old one.

A run on a complete dataset checks every shard against the manifest (`pipeline.dataset.verify_shards`) and
rewrites those that are missing or differ, each byte for byte as before: a unit's shard by tokenizing the unit
again, the tails shard from the kept tails, in the format the manifest records (`shard_format`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.config import RunConfig, to_dict
from pipeline.dataset import (
    COMPLETE,
    MANIFEST,
    SHARD_FORMAT,
    TOKENIZER,
    DatasetError,
    build_manifest,
    dataset_dir,
    eval_rows_table,
    given_tokenizer,
    page_checksums,
    parquet_bytes,
    resolved_data_config,
    shard_name,
    train_rows_table,
    verify_shards,
    write_shard,
)
from pipeline.lease import hold_lease
from pipeline.sources import Unit, in_sample, plan_units, read_unit, split_files
from pipeline.storage import filesystem, join, read_json, write_bytes_atomic, write_json_atomic
from pipeline.tokenizer import Tokenizer, train_tokenizer, training_pieces
from pipeline.tracking import Tag, Tracking, log_params

ItemCallback = Callable[[dict], None]  # called with each finished unit's result


class PrepareError(DatasetError):
    """The job cannot produce a usable dataset; the message says why and what to do."""


def _unit_name(split: str, index: int) -> str:
    return f"_work/units/{split}/unit-{index:05d}"


def _tail_name(index: int) -> str:
    return f"_work/tails/unit-{index:05d}.parquet"


# ---------------------------------------------------------------------------------------------------
# The job


def prepare(cfg: RunConfig, on_item: ItemCallback | None = None) -> dict[str, Any]:
    """Run (or resume, or repair, or skip) the job; returns the manifest plus `stats` of this invocation."""
    out_url = dataset_dir(cfg)
    fs, out = filesystem(out_url)
    started = time.perf_counter()
    if fs.exists(join(out, COMPLETE)):
        return _repair(cfg, on_item)

    src = cfg.data.source
    files = split_files(src, cfg.data.splits)  # fails fast on a missing path or an empty glob
    units = {split: plan_units(src, split, paths) for split, paths in files.items()}
    fs.makedirs(out, exist_ok=True)

    from pipeline.cluster import connect

    connect(cfg.ray)
    sample_split = "train" if "train" in units else cfg.data.splits[0]
    model_bytes = _ensure_tokenizer(cfg, fs, out, units[sample_split], files[sample_split])
    stage_seconds = {"plan_and_tokenizer": time.perf_counter() - started}

    unit_results = _tokenize([u.to_dict() for split in units for u in units[split]], cfg, fs, out,
                             SHARD_FORMAT["page_checksum"], on_item)
    stage_seconds["tokenize_and_pack"] = time.perf_counter() - started - sum(stage_seconds.values())
    by_split = _results_by_split(unit_results, list(units))
    tail_shard = None
    if "train" in by_split:
        tail_shard = _pack_tails(fs, out, [r["index"] for r in by_split["train"]], cfg.data.pack.seq_len,
                                 SHARD_FORMAT["page_checksum"])
    stage_seconds["tails"] = time.perf_counter() - started - sum(stage_seconds.values())

    manifest = build_manifest(cfg, model_bytes, by_split, tail_shard)
    write_json_atomic(fs, join(out, MANIFEST), manifest)
    write_bytes_atomic(fs, join(out, COMPLETE), b"")
    _drop_sidecars(fs, out)  # the tails stay: a repair of the tails shard needs them

    seconds = time.perf_counter() - started
    stage_seconds["manifest"] = seconds - sum(stage_seconds.values())
    tokens = sum(s["tokens"] for s in manifest["splits"].values())
    stats = {
        "skipped": False,
        "dataset": out_url,
        "seconds": seconds,
        "stage_seconds": stage_seconds,
        "tokens_per_second": tokens / seconds,
        "repaired_shards": 0,
    }
    return {**manifest, "stats": stats}


def _tokenize(items: list[dict], cfg: RunConfig, fs, out: str, page_checksum: bool,
              on_item: ItemCallback | None) -> list[dict]:
    """Tokenize and pack the units `items` (those not done yet) on an actor pool; the results of all of them."""
    import ray

    num_actors = cfg.data.num_actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
    return _run_items(
        items,
        done=lambda u: join(out, _unit_name(u["split"], u["index"]) + ".json"),
        fs=fs,
        task=dict(
            fn=_TokenizeUnits,
            fn_constructor_kwargs={"source": to_dict(cfg.data.source), "out_url": dataset_dir(cfg),
                                   "pack": to_dict(cfg.data.pack), "page_checksum": page_checksum},
            compute=ray.data.ActorPoolStrategy(size=num_actors),
        ),
        on_item=on_item,
    )


def _repair(cfg: RunConfig, on_item: ItemCallback | None) -> dict[str, Any]:
    """A complete dataset: check every shard against the manifest and rewrite those that are missing or differ,
    each to the bytes the manifest names. A unit's shard is rewritten by tokenizing the unit again; the tails shard
    is packed again from `_work/tails/`, kept after completion for this (at most one row per training unit, so
    small), rather than from every training unit tokenized again (the whole split's work, for one shard). The
    tails a dataset lacks (one from before they were kept) are tokenized again, their units' shards rewritten
    with them (the same bytes)."""
    out_url = dataset_dir(cfg)
    fs, out = filesystem(out_url)
    started = time.perf_counter()
    manifest = read_json(fs, join(out, MANIFEST))
    bad = verify_shards(out_url, list(manifest["splits"]))
    stage_seconds = {"verify": time.perf_counter() - started}
    if bad:
        reasons = {f: "its sha256 differed from the manifest's" if fs.exists(join(out, f)) else "it was missing"
                   for f in bad}
        _rewrite(cfg, manifest, bad, on_item)
        for file in bad:
            print(f"[prepare] rewrote {file} ({reasons[file]})")
        stage_seconds["rewrite"] = time.perf_counter() - started - stage_seconds["verify"]
    stats = {
        "skipped": not bad,
        "dataset": out_url,
        "seconds": time.perf_counter() - started,
        "stage_seconds": stage_seconds,
        "checked_shards": sum(len(s["shards"]) for s in manifest["splits"].values()),
        "repaired_shards": len(bad),
    }
    return {**manifest, "stats": stats}


def _rewrite(cfg: RunConfig, manifest: dict, bad: list[str], on_item: ItemCallback | None) -> None:
    """Write the shards `bad` of the complete dataset again, as the manifest records them (see `_repair`)."""
    from pipeline.cluster import connect

    fs, out = filesystem(dataset_dir(cfg))
    src = cfg.data.source
    files = split_files(src, list(manifest["splits"]))
    units = {split: plan_units(src, split, paths) for split, paths in files.items()}
    by_file = {shard_name(u.split, u.index): u for split_units in units.values() for u in split_units}
    tails_file = shard_name("train", len(units["train"])) if "train" in units else None
    unknown = [f for f in bad if f not in by_file and f != tails_file]
    if unknown:
        raise PrepareError(f"{', '.join(unknown)}: no unit of the corpus makes it any more (the corpus at "
                           f"{src.path} changed since the dataset was made); delete {dataset_dir(cfg)} and run "
                           "`gss prepare` again to make it anew")
    _drop_sidecars(fs, out)  # left by a run stopped before it dropped them: they say nothing of the shards now
    todo = {f: by_file[f] for f in bad if f in by_file}
    if tails_file in bad:
        todo |= {shard_name("train", u.index): u for u in units["train"]
                 if not fs.exists(join(out, _tail_name(u.index)))}
    page_checksum = page_checksums(manifest)
    connect(cfg.ray)
    written = {r["shard"]["file"]: r["shard"] for r in
               _tokenize([u.to_dict() for u in todo.values()], cfg, fs, out, page_checksum, on_item) if r["shard"]}
    if tails_file in bad:
        written[tails_file] = _pack_tails(fs, out, [u.index for u in units["train"]], cfg.data.pack.seq_len,
                                          page_checksum)
    _drop_sidecars(fs, out)
    expected = {s["file"]: s["sha256"] for split in manifest["splits"].values() for s in split["shards"]}
    differ = [f for f in sorted(set(bad) | set(written)) if (written.get(f) or {}).get("sha256") != expected.get(f)]
    if differ:
        raise PrepareError(f"{', '.join(differ)} still differ from the manifest once written again: the corpus or "
                           f"{TOKENIZER} changed since the dataset was made; delete {dataset_dir(cfg)} and run "
                           "`gss prepare` again to make it anew")


def _drop_sidecars(fs, out: str) -> None:
    """Remove the units' sidecars (`_work/units/`), which only an unfinished run needs."""
    if fs.exists(join(out, "_work", "units")):
        fs.rm(join(out, "_work", "units"), recursive=True)


def _results_by_split(unit_results: list[dict], splits: list[str]) -> dict[str, list[dict]]:
    """{split: its units' results in unit order}; a split without a single usable document is an error."""
    by_split: dict[str, list[dict]] = {split: [] for split in splits}
    for r in unit_results:
        by_split[r["split"]].append(r)
    for split, results in by_split.items():
        results.sort(key=lambda r: r["index"])
        if not any(r["documents"] for r in results):
            reasons = Counter(s["reason"].split(":")[0] for r in results for s in r["skips"])
            raise PrepareError(
                f"split {split!r} has no usable documents: {sum(r['filtered'] for r in results)} filtered out, "
                f"{sum(reasons.values())} skipped ({dict(reasons) or 'none'}); check data.source "
                "(path, splits, text_field, languages, licenses)"
            )
    return by_split


def _run_items(items: list[dict], done, fs, task: dict, on_item: ItemCallback | None) -> list[dict]:
    """Run the items whose sidecar is missing through Ray Data; return the results of all items."""
    import ray

    finished, pending = [], []
    for item in items:
        if fs.exists(done(item)):
            finished.append(read_json(fs, done(item)))
        else:
            pending.append(item)
    if pending:
        ds = ray.data.from_items([{"item": json.dumps(i)} for i in pending], override_num_blocks=len(pending))
        ds = ds.map_batches(batch_size=1, **task)
        with tqdm(total=len(items), initial=len(finished), desc="[prepare] tokenize", unit="unit",
                  dynamic_ncols=True) as bar:
            for row in ds.iter_rows():  # streams: each result arrives as soon as its item is written
                result = json.loads(row["result"])
                finished.append(result)
                bar.update()
                if on_item:
                    on_item(result)
    return finished


# ---------------------------------------------------------------------------------------------------
# Stage 1: tokenizer


def _ensure_tokenizer(cfg: RunConfig, fs, out: str, train_units: list[Unit], train_files: list[str]) -> bytes:
    path = join(out, TOKENIZER)
    if fs.exists(path):
        with fs.open(path, "rb") as f:
            return f.read()
    tok = cfg.data.tokenizer
    if tok.path:
        model_bytes = given_tokenizer(tok.path)
    else:
        import ray

        src = cfg.data.source
        src_fs, _ = filesystem(src.path, src.storage_options)
        total = sum(size or 0 for size in src_fs.sizes(train_files))
        fraction = min(1.0, tok.sample_bytes / max(total, 1))
        ds = ray.data.from_items([{"item": json.dumps(u.to_dict())} for u in train_units],
                                 override_num_blocks=len(train_units))
        ds = ds.map_batches(_sample_documents, batch_size=1,
                            fn_kwargs={"source": to_dict(src), "fraction": fraction, "seed": tok.seed})
        texts, size = [], 0
        for row in ds.iter_rows():  # in corpus order (preserve_order is set by `connect`)
            if size >= tok.sample_bytes:
                break
            texts.append(row["text"])
            size += len(row["text"])
        if not texts:
            raise PrepareError("no training text to train the tokenizer on; check data.source")
        model_bytes = train_tokenizer(texts, tok)
    write_bytes_atomic(fs, path, model_bytes)
    return model_bytes


def _source_config(source: dict):
    from pipeline.config import SourceConfig, from_dict

    return from_dict(SourceConfig, source)


def _sample_documents(batch: dict, source: dict, fraction: float, seed: int) -> dict:
    """Pieces of documents (whole lines, at most 16 KB), each kept with probability `fraction`.

    The key is the document's place relative to the corpus root and the piece's index, so a corpus
    samples the same wherever it is stored, and a few long books still give a sample of about the
    asked size instead of all or nothing.
    """
    cfg = _source_config(source)
    root = filesystem(cfg.path, cfg.storage_options)
    prefix = root[0].unstrip_protocol(root[1])
    texts = []
    for item in batch["item"]:
        for doc in read_unit(cfg, json.loads(item)).documents:
            name = doc.source.removeprefix(prefix)
            texts += [p for i, p in enumerate(training_pieces([doc.text])) if in_sample(f"{name}#{i}", fraction, seed)]
    return {"text": texts}


# ---------------------------------------------------------------------------------------------------
# Stage 2: tokenize and pack units


class _TokenizeUnits:
    """A Ray Data actor: holds the SentencePiece processor, turns each unit into a finished shard."""

    def __init__(self, source: dict, out_url: str, pack: dict, page_checksum: bool):
        self.cfg = _source_config(source)
        self.page_checksum = page_checksum
        self.fs, self.out = filesystem(out_url)
        # read here, not passed in: constructor arguments that large would go through the object store
        self.tokenizer = Tokenizer(self.fs.cat_file(join(self.out, TOKENIZER)))
        self.seq_len, self.piece_tokens = pack["seq_len"], pack["eval_piece_tokens"]

    def __call__(self, batch: dict) -> dict:
        return {"result": [json.dumps(self.tokenize(json.loads(item))) for item in batch["item"]]}

    def tokenize(self, unit: dict) -> dict:
        split, read = unit["split"], read_unit(self.cfg, unit)
        # all cores of the node: while the pool drains, the last actor still uses every core
        arrays = self.tokenizer.encode_documents([d.text for d in read.documents], num_threads=os.cpu_count() or 1)
        n_bytes = [len(d.text.encode()) for d in read.documents]
        result = {
            "split": split,
            "index": unit["index"],
            "documents": len(arrays),
            "tokens": sum(len(a) for a in arrays),
            # whitespace words, for word-level perplexity: only evaluation splits need them (and they cost ~20%)
            "words": 0,
            "bytes": sum(n_bytes),
            "filtered": read.filtered,
            "skips": [dataclasses.asdict(s) for s in read.skips],
            "shard": None,
        }
        if split == "train":
            stream = np.concatenate(arrays) if arrays else np.zeros(0, np.int32)
            starts = np.cumsum([0] + [len(a) for a in arrays[:-1]]) if arrays else np.zeros(0, np.int64)
            rows = max(0, len(stream) - 1) // self.seq_len  # full rows: each needs the token after its inputs
            cut = rows * self.seq_len  # the last row's last token: a target here, the tail's first input
            table = train_rows_table(stream[: cut + 1 if rows else 0], starts[starts < cut], self.seq_len)
            tail = train_rows_table(stream[cut:], starts[starts >= cut] - cut, self.seq_len)
            tail_bytes = parquet_bytes(tail, page_checksum=True, compression="none")  # kept: checked when read
            write_bytes_atomic(self.fs, join(self.out, _tail_name(unit["index"])), tail_bytes)
        else:
            words = [len(d.text.split()) for d in read.documents]
            result["words"] = sum(words)
            table = eval_rows_table(arrays, [d.source for d in read.documents], words, n_bytes, self.piece_tokens)
        if table.num_rows:
            result["shard"] = write_shard(self.fs, self.out, split, unit["index"], table, self.page_checksum)
        write_json_atomic(self.fs, join(self.out, _unit_name(split, unit["index"]) + ".json"), result)  # last
        return result


# ---------------------------------------------------------------------------------------------------
# Stage 3: the training units' tails


def _pack_tails(fs, out: str, indices: list[int], seq_len: int, page_checksum: bool) -> dict | None:
    """The tails of the training units (their indices), in unit order, as one stream cut into rows: the last
    training shard.

    A seam between two tails is a pair of the corpus where the second unit has no full row; otherwise the
    second tail starts with its unit's last full row's last token, a target there and again here (see
    `pipeline.dataset`).
    """
    streams, starts, offset = [], [], 0
    for index in indices:
        path = join(out, _tail_name(index))
        data = fs.cat_file(path)
        try:  # kept after completion: checked, as shards are
            tail = pq.read_table(pa.BufferReader(data), page_checksum_verification=True)
        except (pa.ArrowException, OSError) as e:  # parsed from memory: no I/O error, a damaged file
            raise PrepareError(f"{path} cannot be read ({str(e).splitlines()[0]}): delete it and run `gss prepare` "
                               "again, which tokenizes its unit again") from None
        if tail.num_rows:
            tokens = tail["tokens"][0].values.to_numpy()
            streams.append(tokens)
            starts.append(tail["doc_starts"][0].values.to_numpy().astype(np.int64) + offset)
            offset += len(tokens)
    if not offset:
        return None
    table = train_rows_table(np.concatenate(streams), np.concatenate(starts), seq_len)
    return write_shard(fs, out, "train", len(indices), table, page_checksum)


def prepare_stage(cfg: RunConfig, on_item: ItemCallback | None = None,
                  tracking: Tracking | None = None) -> dict[str, Any]:
    """`prepare` as a tracked stage: an MLflow run with the config, the counts, the manifest and the tokenizer;
    one writer of the dataset folder at a time (its lease, `pipeline.lease`)."""
    import mlflow

    tracking = tracking or Tracking.of(cfg)
    dataset = dataset_dir(cfg)
    with hold_lease(dataset, "gss prepare"), tracking.stage_run(cfg, "prepare", {Tag.DATASET: dataset}):
        log_params({"data": resolved_data_config(cfg)})
        manifest = prepare(cfg, on_item)
        stats = manifest["stats"]
        mlflow.set_tags({Tag.TOKENIZER_SHA256: manifest["tokenizer"]["sha256"], Tag.SKIPPED: stats["skipped"]})
        metrics = {k: v for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        metrics.update({f"seconds.{k}": v for k, v in stats.get("stage_seconds", {}).items()})
        for split, counts in manifest["splits"].items():
            metrics.update({f"{split}.{k}": counts[k] for k in ("documents", "tokens", "words", "bytes", "rows",
                                                                   "skipped", "filtered")})
            metrics[f"{split}.shards"] = len(counts["shards"])
        mlflow.log_metrics(metrics)
        mlflow.log_dict({k: v for k, v in manifest.items() if k != "stats"}, "manifest.json")
        fs, out = filesystem(stats["dataset"])
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, TOKENIZER)
            with open(local, "wb") as f:
                f.write(fs.cat_file(join(out, TOKENIZER)))
            mlflow.log_artifact(local)
    print(summary(manifest))
    return manifest


def summary(manifest: dict) -> str:
    """A few lines for the terminal at the end of the job."""
    stats = manifest.get("stats", {})
    complete = "checked_shards" in stats  # a run on a complete dataset: checked, and repaired if need be
    header = f"[prepare] dataset {stats.get('dataset', '')}"
    if complete:
        checked, repaired = stats["checked_shards"], stats["repaired_shards"]
        header += f"  (already complete: {checked - repaired} of {checked} shards matched the manifest, " \
                  f"{repaired} rewritten)"
    lines = [header]
    for split, s in manifest["splits"].items():
        lines.append(
            f"  {split:<10} {s['documents']:>8,} docs {s['tokens']:>13,} tokens {len(s['shards']):>4} shards"
            f" {s['rows']:>8,} rows  {s['skipped']} skipped {s['skip_reasons'] or ''}  {s['filtered']} filtered"
        )
    if stats:
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in stats["stage_seconds"].items())
        rate = "every shard read once" if complete else f"{stats['tokens_per_second']:,.0f} tokens/s"
        lines.append(f"  {stats['seconds']:.1f} s ({stages}), {rate}")
    return "\n".join(lines)
