"""`gss prepare`: raw corpus -> SentencePiece tokenizer -> tokenized, packed Parquet shards.

Output, under `<root>/datasets/<kind>-<fingerprint of the data config>/`:

    tokenizer.model
    train/shard-00000.parquet ...       rows of exactly seq_len tokens (only the very last row may be shorter):
                                        row, tokens, doc_starts (offsets where a document begins), first_doc
    validation/shard-00000.parquet ...  one row per document piece: doc, piece, n_pieces, tokens, source,
    test/...                            n_words, n_bytes (of the whole document)
    manifest.json                       resolved config, tokenizer hash, per-shard rows/tokens/sha256, counts, skips
    _COMPLETE                           written last; its presence means everything above is final

Stages, each a Ray Data job over work items that are done at most once:

1. tokenizer: sample training documents (a hash of their name decides, so any partitioning samples
   the same ones) and train SentencePiece; or copy the one given.
2. tokenize: units of the corpus (see `sources`) go to an actor pool that holds the SentencePiece
   processor; each unit's token arrays are written to `_work/` with a JSON sidecar written last.
3. pack: the documents of a split, in corpus order, each followed by the end-of-document id, are one
   stream; shard k holds rows [k*R, (k+1)*R) of it. Each shard is written by its own task, reading
   only the units it overlaps, and its sidecar is written last.

A re-run skips every item whose sidecar exists, so an interrupted job resumes with no duplicates and
no gaps, and its output is byte for byte that of an uninterrupted run. A different data config is a
different fingerprint, hence a new folder beside the old one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import RunConfig, fingerprint, to_dict
from pipeline.sources import Unit, in_sample, plan_units, read_unit, split_files
from pipeline.storage import filesystem, join, read_json, write_bytes_atomic, write_json_atomic
from pipeline.tokenizer import Tokenizer, tokenizer_hash, train_tokenizer, training_pieces

MANIFEST = "manifest.json"
COMPLETE = "_COMPLETE"
TOKENIZER = "tokenizer.model"
FORMAT_VERSION = 1

ItemCallback = Callable[[str, dict], None]  # (stage, item result) after each finished work item


class PrepareError(RuntimeError):
    """The job cannot produce a usable dataset; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------------
# Identity and layout


def data_identity(cfg: RunConfig) -> dict[str, Any]:
    """Everything that determines the dataset's bytes, and nothing that only changes how fast it is made."""
    data = to_dict(cfg.data)
    data.pop("num_actors")
    data["source"].pop("storage_options")  # credentials do not change the data
    tok = data["tokenizer"]
    if tok["path"]:  # a given tokenizer is identified by its content, not its path
        tok = {"sha256": tokenizer_hash(_read_bytes(tok["path"]))}
    data["tokenizer"] = tok
    data["format_version"] = FORMAT_VERSION
    return data


def dataset_dir(cfg: RunConfig) -> str:
    return join(cfg.root, "datasets", f"{cfg.data.source.kind}-{fingerprint(data_identity(cfg))}")


def is_complete(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(join(path, COMPLETE))


def load_manifest(url: str) -> dict[str, Any]:
    fs, path = filesystem(url)
    if not fs.exists(join(path, COMPLETE)):
        raise PrepareError(f"dataset {url} is not complete: run `gss prepare` with the same data config first")
    return read_json(fs, join(path, MANIFEST))


def _read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    if not fs.exists(path):
        raise PrepareError(f"data.tokenizer.path {url!r} does not exist")
    with fs.open(path, "rb") as f:
        return f.read()


def _unit_name(split: str, index: int) -> str:
    return f"_work/tokens/{split}/unit-{index:05d}"


def _shard_name(split: str, index: int) -> str:
    return f"{split}/shard-{index:05d}"


# ---------------------------------------------------------------------------------------------------
# The job


def prepare(cfg: RunConfig, on_item: ItemCallback | None = None) -> dict[str, Any]:
    """Run (or resume, or skip) the job; returns the manifest plus `stats` of this invocation."""
    import ray

    out_url = dataset_dir(cfg)
    fs, out = filesystem(out_url)
    started = time.perf_counter()
    if fs.exists(join(out, COMPLETE)):
        manifest = read_json(fs, join(out, MANIFEST))
        return {**manifest, "stats": {"skipped": True, "dataset": out_url, "seconds": 0.0}}

    src = cfg.data.source
    files = split_files(src, cfg.data.splits)  # fails fast on a missing path or an empty glob
    units = {split: plan_units(src, split, paths) for split, paths in files.items()}
    fs.makedirs(out, exist_ok=True)

    from pipeline.cluster import connect

    connect(cfg.ray)
    num_actors = cfg.data.num_actors or max(1, int(ray.cluster_resources().get("CPU", 1)))

    sample_split = "train" if "train" in units else cfg.data.splits[0]
    model_bytes = _ensure_tokenizer(cfg, fs, out, units[sample_split], files[sample_split])
    stage_seconds = {"plan_and_tokenizer": time.perf_counter() - started}

    unit_results = _run_items(
        "tokenize",
        [u.to_dict() for split in units for u in units[split]],
        done=lambda u: join(out, _unit_name(u["split"], u["index"]) + ".json"),
        fs=fs,
        task=dict(
            fn=_TokenizeUnits,
            fn_constructor_kwargs={"source": to_dict(src), "model_bytes": model_bytes, "out_url": out_url},
            compute=ray.data.ActorPoolStrategy(size=num_actors),
        ),
        on_item=on_item,
    )
    stage_seconds["tokenize"] = time.perf_counter() - started - sum(stage_seconds.values())
    by_split: dict[str, list[dict]] = {split: [] for split in units}
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

    pack = cfg.data.pack
    shard_plans = [p for split, results in by_split.items() for p in _plan_shards(split, results, pack, out_url)]
    shard_results = _run_items(
        "pack",
        shard_plans,
        done=lambda p: join(out, _shard_name(p["split"], p["index"]) + ".json"),
        fs=fs,
        task=dict(fn=_write_shards, fn_kwargs={"out_url": out_url, "pack": to_dict(pack)}, num_cpus=1),
        on_item=on_item,
    )

    stage_seconds["pack"] = time.perf_counter() - started - sum(stage_seconds.values())
    manifest = _manifest(cfg, model_bytes, by_split, shard_results)
    write_json_atomic(fs, join(out, MANIFEST), manifest)
    write_bytes_atomic(fs, join(out, COMPLETE), b"")
    for path in fs.glob(join(out, "*", "*.json")):  # shard sidecars: their content is in the manifest now
        fs.rm(path)
    fs.rm(join(out, "_work"), recursive=True)

    seconds = time.perf_counter() - started
    stage_seconds["manifest"] = seconds - sum(stage_seconds.values())
    tokens = sum(s["tokens"] for s in manifest["splits"].values())
    stats = {
        "skipped": False,
        "dataset": out_url,
        "seconds": seconds,
        "stage_seconds": stage_seconds,
        "tokens_per_second": tokens / seconds,
    }
    return {**manifest, "stats": stats}


def _run_items(stage: str, items: list[dict], done, fs, task: dict, on_item: ItemCallback | None) -> list[dict]:
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
        for row in ds.iter_rows():  # streams: each result arrives as soon as its item is written
            result = json.loads(row["result"])
            finished.append(result)
            if on_item:
                on_item(stage, result)
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
        model_bytes = _read_bytes(tok.path)
    else:
        import ray

        src = cfg.data.source
        src_fs, _ = filesystem(src.path, src.storage_options)
        total = sum(size or 0 for size in src_fs.sizes([src_fs._strip_protocol(p) for p in train_files]))
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
# Stage 2: tokenize units


class _TokenizeUnits:
    """A Ray Data actor: holds the SentencePiece processor, tokenizes units, writes their token arrays."""

    def __init__(self, source: dict, model_bytes: bytes, out_url: str):
        self.cfg = _source_config(source)
        self.tokenizer = Tokenizer(model_bytes)
        self.fs, self.out = filesystem(out_url)

    def __call__(self, batch: dict) -> dict:
        return {"result": [json.dumps(self.tokenize(json.loads(item))) for item in batch["item"]]}

    def tokenize(self, unit: dict) -> dict:
        read = read_unit(self.cfg, unit)
        arrays = [self.tokenizer.encode_document(d.text) for d in read.documents]
        # whitespace words, for word-level perplexity: only evaluation splits need them (and they cost ~20%)
        words = [len(d.text.split()) if unit["split"] != "train" else 0 for d in read.documents]
        lengths = np.array([len(a) for a in arrays], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = np.concatenate(arrays) if arrays else np.zeros(0, np.int32)
        table = pa.table({
            "tokens": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.int32())),
            "source": [d.source for d in read.documents],
            "n_words": pa.array(words, pa.int64()),
            "n_bytes": pa.array([len(d.text.encode()) for d in read.documents], pa.int64()),
        })
        name = join(self.out, _unit_name(unit["split"], unit["index"]))
        write_bytes_atomic(self.fs, name + ".parquet", _parquet_bytes(table, compression="none"))  # read once
        result = {
            "split": unit["split"],
            "index": unit["index"],
            "documents": len(arrays),
            "tokens": int(lengths.sum()),
            "words": sum(words),
            "bytes": int(table["n_bytes"].to_numpy().sum()) if arrays else 0,
            "filtered": read.filtered,
            "skips": [dataclasses.asdict(s) for s in read.skips],
        }
        write_json_atomic(self.fs, name + ".json", result)  # last: the unit is done
        return result


def _parquet_bytes(table: pa.Table, compression: str = "zstd") -> bytes:
    buf = io.BytesIO()
    # token ids barely gain from Parquet dictionaries over zstd alone, and they cost a third of the write time
    pq.write_table(table, buf, compression=compression, use_dictionary=False)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------
# Stage 3: pack and write shards


def _plan_shards(split: str, units: list[dict], pack, out_url: str) -> list[dict]:
    """Shards of a split as token ranges (train) or unit ranges (evaluation splits)."""
    refs, token_start, doc_start = [], 0, 0
    for u in units:
        refs.append({"index": u["index"], "token_start": token_start, "doc_start": doc_start, "tokens": u["tokens"]})
        token_start += u["tokens"]
        doc_start += u["documents"]
    plans = []
    if split == "train":
        rows_per_shard = max(1, pack.shard_tokens // pack.seq_len)
        shard_tokens = rows_per_shard * pack.seq_len
        for k, start in enumerate(range(0, token_start, shard_tokens)):
            end = min(start + shard_tokens, token_start)
            overlap = [r for r in refs if r["token_start"] < end and r["token_start"] + r["tokens"] > start]
            plans.append({"split": split, "index": k, "token_start": start, "token_end": end, "units": overlap})
    else:
        group: list[dict] = []
        for r in refs:
            group.append(r)
            if sum(g["tokens"] for g in group) >= pack.shard_tokens or r is refs[-1]:
                plans.append({"split": split, "index": len(plans), "units": group})
                group = []
    return plans


def _write_shards(batch: dict, out_url: str, pack: dict) -> dict:
    fs, out = filesystem(out_url)
    results = []
    for item in batch["item"]:
        plan = json.loads(item)
        table = _train_rows(fs, out, plan, pack["seq_len"]) if plan["split"] == "train" else _eval_rows(
            fs, out, plan, pack["eval_piece_tokens"])
        data = _parquet_bytes(table)
        name = join(out, _shard_name(plan["split"], plan["index"]))
        write_bytes_atomic(fs, name + ".parquet", data)
        tokens = int(pc.sum(pc.list_value_length(table["tokens"])).as_py() or 0)
        result = {
            "split": plan["split"],
            "index": plan["index"],
            "file": _shard_name(plan["split"], plan["index"]) + ".parquet",
            "rows": table.num_rows,
            "tokens": tokens,
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        write_json_atomic(fs, name + ".json", result)  # last: the shard is done
        results.append(json.dumps(result))
    return {"result": results}


def _read_unit_tokens(fs, out: str, split: str, index: int) -> pa.Table:
    with fs.open(join(out, _unit_name(split, index) + ".parquet"), "rb") as f:
        return pq.read_table(f)


def _train_rows(fs, out: str, plan: dict, seq_len: int) -> pa.Table:
    start, end = plan["token_start"], plan["token_end"]  # start is a multiple of seq_len
    pieces, doc_positions, doc_indices = [], [], []
    for ref in plan["units"]:
        column = _read_unit_tokens(fs, out, plan["split"], ref["index"])["tokens"].combine_chunks()
        unit_start = ref["token_start"]
        pieces.append(column.values.to_numpy()[max(start - unit_start, 0): end - unit_start])
        positions = column.offsets.to_numpy()[:-1] + unit_start  # where each document starts in the split
        doc_positions.append(positions)
        doc_indices.append(ref["doc_start"] + np.arange(len(positions)))
    tokens = np.concatenate(pieces)
    positions, indices = np.concatenate(doc_positions), np.concatenate(doc_indices)
    row_starts = np.arange(start, end, seq_len)
    row_bounds = np.append(row_starts, end) - start  # offsets of the rows in `tokens`
    inside = positions[(positions >= start) & (positions < end)] - start
    cuts = np.searchsorted(inside, row_bounds)
    return pa.table({
        "row": pa.array(row_starts // seq_len, pa.int64()),
        "tokens": pa.ListArray.from_arrays(pa.array(row_bounds, pa.int32()), pa.array(tokens, pa.int32())),
        "doc_starts": pa.ListArray.from_arrays(
            pa.array(cuts, pa.int32()), pa.array(inside - np.repeat(row_bounds[:-1], np.diff(cuts)), pa.int32())),
        "first_doc": pa.array(indices[np.searchsorted(positions, row_starts, "right") - 1], pa.int64()),
    })


def _eval_rows(fs, out: str, plan: dict, piece_tokens: int) -> pa.Table:
    rows: dict[str, list] = {k: [] for k in ("doc", "piece", "n_pieces", "tokens", "source", "n_words", "n_bytes")}
    for ref in plan["units"]:
        unit = _read_unit_tokens(fs, out, plan["split"], ref["index"]).to_pydict()
        for i, tokens in enumerate(unit["tokens"]):
            n_pieces = max(1, -(-len(tokens) // piece_tokens))
            for p in range(n_pieces):
                rows["doc"].append(ref["doc_start"] + i)
                rows["piece"].append(p)
                rows["n_pieces"].append(n_pieces)
                rows["tokens"].append(tokens[p * piece_tokens: (p + 1) * piece_tokens])
                rows["source"].append(unit["source"][i])
                rows["n_words"].append(unit["n_words"][i])
                rows["n_bytes"].append(unit["n_bytes"][i])
    schema = pa.schema([("doc", pa.int64()), ("piece", pa.int32()), ("n_pieces", pa.int32()),
                        ("tokens", pa.list_(pa.int32())), ("source", pa.string()),
                        ("n_words", pa.int64()), ("n_bytes", pa.int64())])
    return pa.table(rows, schema=schema)


# ---------------------------------------------------------------------------------------------------
# Manifest


def _manifest(cfg: RunConfig, model_bytes: bytes, units: dict[str, list[dict]], shards: list[dict]) -> dict:
    tok = Tokenizer(model_bytes)
    splits = {}
    for split, results in units.items():
        skips = [s for r in results for s in r["skips"]]
        split_shards = sorted((s for s in shards if s["split"] == split), key=lambda s: s["index"])
        splits[split] = {
            "documents": sum(r["documents"] for r in results),
            "tokens": sum(r["tokens"] for r in results),
            "words": sum(r["words"] for r in results),
            "bytes": sum(r["bytes"] for r in results),
            "rows": sum(s["rows"] for s in split_shards),
            "filtered": sum(r["filtered"] for r in results),
            "skipped": len(skips),
            "skip_reasons": dict(sorted(Counter(s["reason"].split(":")[0] for s in skips).items())),
            "skips": skips,
            "shards": [{k: s[k] for k in ("file", "rows", "tokens", "sha256")} for s in split_shards],
        }
    return {
        "format_version": FORMAT_VERSION,
        "data": data_identity(cfg),
        "tokenizer": {"file": TOKENIZER, "sha256": tokenizer_hash(model_bytes), "vocab_size": tok.vocab_size,
                      "eod_id": tok.eod_id},
        "seq_len": cfg.data.pack.seq_len,
        "splits": splits,
    }


def prepare_stage(cfg: RunConfig, on_item: ItemCallback | None = None) -> dict[str, Any]:
    """`prepare` as a tracked stage: an MLflow run with the config, the counts, the manifest and the tokenizer."""
    import mlflow

    from pipeline import tracking

    with tracking.stage_run(cfg, "prepare", **{"gss.dataset": dataset_dir(cfg)}):
        tracking.log_params({"data": data_identity(cfg), "data.num_actors": cfg.data.num_actors})
        manifest = prepare(cfg, on_item)
        stats = manifest["stats"]
        mlflow.set_tags({"gss.tokenizer_sha256": manifest["tokenizer"]["sha256"], "gss.skipped": stats["skipped"]})
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
    lines = [f"dataset {stats.get('dataset', '')}" + ("  (already complete: nothing to do)" if stats.get("skipped") else "")]
    for split, s in manifest["splits"].items():
        lines.append(
            f"  {split:<10} {s['documents']:>8,} docs {s['tokens']:>13,} tokens {len(s['shards']):>4} shards"
            f" {s['rows']:>8,} rows  {s['skipped']} skipped {s['skip_reasons'] or ''}  {s['filtered']} filtered"
        )
    if not stats.get("skipped") and stats:
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in stats["stage_seconds"].items())
        lines.append(f"  {stats['seconds']:.1f} s ({stages}), {stats['tokens_per_second']:,.0f} tokens/s")
    return "\n".join(lines)
