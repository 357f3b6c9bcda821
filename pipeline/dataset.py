"""The dataset: what `gss prepare` hands to training and evaluation, and everything about it, in one place.

A dataset lives in `<root>/datasets/<kind>-<fingerprint of the data config>/`:

    tokenizer.model
    train/shard-00000.parquet ...       training rows (below): tokens, doc_starts. Shard k holds work unit k's
                                        full rows (see `pipeline.sources`); the last shard holds the units' tails.
    validation/shard-00000.parquet ...  one row per document piece: doc (its index in the shard), piece,
    test/...                            n_pieces, tokens, source, n_words, n_bytes (of the whole document)
    manifest.json                       resolved config, tokenizer hash, per-shard rows/tokens (as stored)/sha256,
                                        counts, skips, unit_tail_tokens, shard_format (absent: no page checksums)
    _COMPLETE                           written last; its presence means everything above is final
    _work/tails/unit-00000.parquet ...  each training unit's tail (at most one row), kept to rebuild the tails shard

Shards are verified as they are read: each reader takes a shard's bytes whole, checks their sha256 against the
manifest's and parses them with Parquet's page checksums verified (shards written since `shard_format` was
recorded carry them), and checks its token ids against the vocabulary; `verify_shards` checks whole splits
before a run starts, and `gss prepare` rewrites the shards that do not match.

Training rows. A stream (documents in corpus order, each followed by the end-of-document id) is cut into
rows of L + 1 tokens (L = seq_len) that overlap their neighbour by one: row j = stream[j·L : j·L + L + 1].
Training feeds `model(row[:-1], row[1:])`, L inputs and L targets, so every token is an input once and a
target once. Units are tokenized by separate actors, so each unit k is its own stream: shard k holds its
full rows, and its tail, from the last full row's last token (repeated) to the unit's end (1 to L tokens; the
whole unit if it has no full row), goes, with the other tails in unit order, into the last shard, cut the same
way (only its very last row may be shorter: not a training row). `unit_tail_tokens[k]` in the manifest is that
tail's length: unit k's stream is shard k's rows, then its tail, each piece after the first without the token
it shares with the one before. `doc_starts` lists the offsets in a row where a document begins, each document
once, in the row where its first token is an input (offset < L): a document that starts on a row's last token
is listed in the next row, or in the tails shard.

What the per-unit cut costs (no row spans two units): each unit with a full row, but the first, never has its
first token as a target (no row holds it after the previous unit's last token), and its tail's first token,
already the target ending its last full row, is a target again in the tails shard, after the previous tail
(one token per unit: one in ~8M with 32 MB units). And the tails shard's short last row is not trained: at the
split's very end, up to L tokens are no input and up to L - 1 no target.

This module is the contract between the stages: the folder's identity (`data_identity`, `dataset_dir`), the
rows' layout and the shard writer (used by `pipeline.prepare`), the manifest, and the readers (`TrainRows`,
`eval_documents`, `eval_windows`, `read_tokenizer`) that `pipeline.train` and `pipeline.evaluate` use.
"""

from __future__ import annotations

import functools
import hashlib
import io
import posixpath
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.config import DataConfig, RunConfig, fingerprint, to_dict
from pipeline.storage import filesystem, join, read_json, write_bytes_atomic
from pipeline.tokenizer import Tokenizer, tokenizer_hash

MANIFEST = "manifest.json"
COMPLETE = "_COMPLETE"
TOKENIZER = "tokenizer.model"
FORMAT_VERSION = 3  # 2: a shard per unit plus a tails shard; 3: training rows of seq_len + 1, overlapping by one
# How new shards are written, recorded in the manifest: a repaired shard is written as its dataset's others were,
# so that its bytes match the manifest's sha256 (datasets from before page checksums have no entry).
SHARD_FORMAT = {"page_checksum": True}
REPAIR = "run `gss prepare` with the same config, which rewrites the shards that do not match"
VERIFY_THREADS = 8  # shards hashed at once, for a bucket's slow answers (unmeasured; locally 1 to 8 run alike)


class DatasetError(RuntimeError):
    """A dataset that is missing or cannot be used; the message says what to do."""


# ---------------------------------------------------------------------------------------------------
# Identity: which folder a data config's dataset lives in


def data_identity(cfg: RunConfig) -> dict[str, Any]:
    """Everything that determines the dataset's bytes, and nothing that only changes how fast it is made.

    Only settings that differ from their defaults count, so that a setting added later (with a default
    that keeps the old behaviour) leaves existing datasets where they are. Changing a default's meaning
    is a format change: bump FORMAT_VERSION.
    """
    data = _changed(to_dict(cfg.data), to_dict(DataConfig()))
    data.pop("num_actors", None)
    data.setdefault("source", {}).update(kind=cfg.data.source.kind, path=cfg.data.source.path)
    data["source"].pop("storage_options", None)  # credentials do not change the data
    if cfg.data.tokenizer.path:  # a given tokenizer is identified by its content, not its path
        data["tokenizer"] = {"sha256": tokenizer_hash(given_tokenizer(cfg.data.tokenizer.path))}
    data["format_version"] = FORMAT_VERSION
    return data


def _changed(value: dict[str, Any], default: dict[str, Any]) -> dict[str, Any]:
    """The entries of `value` that differ from `default`, recursively."""
    out = {}
    for key, item in value.items():
        if isinstance(item, dict) and isinstance(default.get(key), dict):
            if sub := _changed(item, default[key]):
                out[key] = sub
        elif key not in default or item != default[key]:
            out[key] = item
    return out


def resolved_data_config(cfg: RunConfig) -> dict[str, Any]:
    """The data config as run, for the record (the manifest, MLflow); credentials left out."""
    data = to_dict(cfg.data)
    data["source"].pop("storage_options")
    return data


def dataset_dir(cfg: RunConfig) -> str:
    return join(cfg.root, "datasets", f"{cfg.data.source.kind}-{fingerprint(data_identity(cfg))}")


def given_tokenizer(url: str) -> bytes:
    """The bytes of the SentencePiece model named by `data.tokenizer.path`."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        raise DatasetError(f"data.tokenizer.path {url!r} does not exist")
    with fs.open(path, "rb") as f:
        return f.read()


# ---------------------------------------------------------------------------------------------------
# Layout and writer: the rows of each split


def shard_name(split: str, index: int) -> str:
    return f"{split}/shard-{index:05d}.parquet"


def row_starts(n: int, seq_len: int) -> np.ndarray:
    """Where the rows of a stream of `n` tokens start: every seq_len tokens, until a row reaches its end."""
    return np.arange(0, max(n - 1, 1), seq_len) if n else np.zeros(0, np.int64)


def train_rows_table(stream: np.ndarray, doc_starts: np.ndarray, seq_len: int) -> pa.Table:
    """`stream` as rows of seq_len + 1 tokens overlapping by one (the last may be shorter).

    doc_starts: the stream offsets where documents begin (none on its last token), each put in the row
    where its token is an input.
    """
    starts = row_starts(len(stream), seq_len)
    lengths = np.minimum(starts + seq_len + 1, len(stream)) - starts
    full = int(np.count_nonzero(lengths == seq_len + 1))
    pieces = [stream[:0]]
    if full:
        pieces.append(np.lib.stride_tricks.sliding_window_view(stream, seq_len + 1)[::seq_len].ravel())
    if full < len(starts):  # a shorter last row
        pieces.append(stream[full * seq_len:])
    values = np.concatenate(pieces)
    cuts = np.append(np.searchsorted(doc_starts, starts), len(doc_starts))
    return pa.table({
        "tokens": pa.ListArray.from_arrays(pa.array(np.append(0, np.cumsum(lengths)), pa.int32()),
                                           pa.array(values, pa.int32())),
        "doc_starts": pa.ListArray.from_arrays(
            pa.array(cuts, pa.int32()), pa.array(doc_starts - np.repeat(starts, np.diff(cuts)), pa.int32())),
    })


EVAL_SCHEMA = pa.schema([("doc", pa.int64()), ("piece", pa.int32()), ("n_pieces", pa.int32()),
                         ("tokens", pa.list_(pa.int32())), ("source", pa.string()),
                         ("n_words", pa.int64()), ("n_bytes", pa.int64())])


def eval_rows_table(arrays: list[np.ndarray], sources: list[str], words: list[int], n_bytes: list[int],
                    piece_tokens: int) -> pa.Table:
    """One row per piece of at most `piece_tokens` of each document, with the whole document's counts."""
    rows: dict[str, list] = {name: [] for name in EVAL_SCHEMA.names}
    for i, tokens in enumerate(arrays):
        n_pieces = max(1, -(-len(tokens) // piece_tokens))
        for p in range(n_pieces):
            for name, value in (("doc", i), ("piece", p), ("n_pieces", n_pieces), ("source", sources[i]),
                                ("tokens", tokens[p * piece_tokens: (p + 1) * piece_tokens]),
                                ("n_words", words[i]), ("n_bytes", n_bytes[i])):
                rows[name].append(value)
    return pa.table(rows, schema=EVAL_SCHEMA)


def parquet_bytes(table: pa.Table, page_checksum: bool, compression: str = "zstd") -> bytes:
    """`table` as a Parquet file; page_checksum: a CRC per page, so that a reader finds a flipped byte (zstd
    itself checks nothing, and a damaged page decodes to wild token ids)."""
    buf = io.BytesIO()
    # token ids barely gain from Parquet dictionaries over zstd alone, and they cost a third of the write time
    pq.write_table(table, buf, compression=compression, use_dictionary=False, write_page_checksum=page_checksum)
    return buf.getvalue()


def write_shard(fs, out: str, split: str, index: int, table: pa.Table, page_checksum: bool) -> dict[str, Any]:
    """Write shard `index` of `split` atomically; returns its manifest entry."""
    data = parquet_bytes(table, page_checksum)
    name = shard_name(split, index)
    write_bytes_atomic(fs, join(out, name), data)
    tokens = int(pc.sum(pc.list_value_length(table["tokens"])).as_py() or 0)
    return {"file": name, "rows": table.num_rows, "tokens": tokens, "sha256": hashlib.sha256(data).hexdigest()}


# ---------------------------------------------------------------------------------------------------
# Manifest


def build_manifest(cfg: RunConfig, model_bytes: bytes, units: dict[str, list[dict]], tail_shard: dict | None) -> dict:
    """The manifest from the per-unit results of `gss prepare` ({split: [unit result]}, in unit order)."""
    tok = Tokenizer(model_bytes)
    splits = {}
    for split, results in units.items():
        skips = [s for r in results for s in r["skips"]]
        shards = [r["shard"] for r in results if r["shard"]] + ([tail_shard] if split == "train" and tail_shard else [])
        splits[split] = {
            "documents": sum(r["documents"] for r in results),
            "tokens": sum(r["tokens"] for r in results),
            "words": sum(r["words"] for r in results),
            "bytes": sum(r["bytes"] for r in results),
            "rows": sum(s["rows"] for s in shards),
            "filtered": sum(r["filtered"] for r in results),
            "skipped": len(skips),
            "skip_reasons": dict(sorted(Counter(s["reason"].split(":")[0] for s in skips).items())),
            "skips": skips,
            "shards": shards,
        }
        if split == "train":  # unit k's tail: what its shard's rows do not hold as inputs (seq_len per row)
            seq_len = cfg.data.pack.seq_len
            splits[split]["unit_tail_tokens"] = [r["tokens"] - (r["shard"] or {"rows": 0})["rows"] * seq_len
                                                 for r in results]
    return {
        "format_version": FORMAT_VERSION,
        "data": resolved_data_config(cfg),
        "identity": data_identity(cfg),
        "tokenizer": {"file": TOKENIZER, "sha256": tokenizer_hash(model_bytes), "vocab_size": tok.vocab_size,
                      "eod_id": tok.eod_id},
        "seq_len": cfg.data.pack.seq_len,
        "shard_format": dict(SHARD_FORMAT),
        "splits": splits,
    }


def page_checksums(manifest: dict[str, Any]) -> bool:
    """Whether the dataset's shards were written with Parquet page checksums."""
    return manifest.get("shard_format", {}).get("page_checksum", False)


def is_complete(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(join(path, COMPLETE))


def load_manifest(url: str) -> dict[str, Any]:
    fs, path = filesystem(url)
    if not fs.exists(join(path, COMPLETE)):
        raise DatasetError(f"dataset {url} is not complete: run `gss prepare` with the same data config first")
    return read_json(fs, join(path, MANIFEST))


# ---------------------------------------------------------------------------------------------------
# Readers


def read_tokenizer(url: str) -> Tokenizer:
    """The dataset's tokenizer (a clear error if the dataset is not complete)."""
    return Tokenizer(read_tokenizer_file(url))


def read_tokenizer_file(url: str) -> bytes:
    """The dataset's SentencePiece model file, as bytes (a clear error if the dataset is not complete)."""
    load_manifest(url)
    fs, path = filesystem(url)
    return fs.cat_file(join(path, TOKENIZER))


def _written_wrong(dataset_url: str, file: str, what: str) -> DatasetError:
    """A shard whose bytes are the manifest's but not a usable shard: `gss prepare` wrote it wrong, so a repair
    (which writes the manifest's bytes) cannot help."""
    return DatasetError(f"{join(dataset_url, file)} {what}, though its sha256 matches the manifest's: the dataset "
                        f"was written wrong; delete {dataset_url} and run `gss prepare` with the same config to make "
                        "it anew")


def read_shard(dataset_url: str, shard: dict[str, Any], columns: list[str] | None = None) -> pa.Table:
    """Shard `shard` (its manifest entry) of the dataset, its bytes checked against the manifest's sha256 (they are
    in memory anyway) and parsed with Parquet's page checksums verified, where it has them."""
    fs, path = filesystem(dataset_url)
    url = join(dataset_url, shard["file"])
    try:
        data = fs.cat_file(join(path, shard["file"]))
    except FileNotFoundError:
        raise DatasetError(f"{url} is missing: {REPAIR}") from None
    if hashlib.sha256(data).hexdigest() != shard["sha256"]:
        raise DatasetError(f"{url} is corrupt (its sha256 differs from the manifest's): {REPAIR}")
    try:
        return pq.read_table(pa.BufferReader(data), columns=columns, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as e:  # parsed from memory: a damaged file, not a failed read
        raise _written_wrong(dataset_url, shard["file"], f"cannot be read ({str(e).splitlines()[0]})") from None


def check_token_ids(tokens: np.ndarray, vocab_size: int, dataset_url: str, file: str) -> None:
    """Token ids outside [0, vocab_size) are a shard written wrong (a corrupt one fails its sha256 first)."""
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab_size):
        bad = tokens.min() if tokens.min() < 0 else tokens.max()
        raise _written_wrong(dataset_url, file, f"holds token id {bad}, outside the vocabulary [0, {vocab_size})")


def verify_shards(dataset_url: str, splits: list[str]) -> list[str]:
    """The shards of `splits` (their files in the dataset) that are missing or whose sha256 differs from the
    manifest's, checked before a run relies on them. Reads every byte of them once, streaming, a few files at a
    time, with a progress bar: about 1.1 GB/s from a local disk (measured on 2 cores, the files in the page cache;
    sha256 alone runs at 1.4 GB/s on one core), so some 10 s per 10 GB of shards; a bucket serves fewer bytes
    per second."""
    manifest = load_manifest(dataset_url)
    fs, path = filesystem(dataset_url)
    bad = []
    for split in splits:
        if split not in manifest["splits"]:
            raise DatasetError(f"split {split!r} is not in {dataset_url} (it has {', '.join(manifest['splits'])}); "
                               f"add it to data.splits and run `gss prepare`")
        shards = manifest["splits"][split]["shards"]
        found = fs.find(join(path, split), detail=True)  # one listing: the sizes, for the bar
        sizes = {posixpath.basename(name): info["size"] for name, info in found.items()}
        present = [s for s in shards if posixpath.basename(s["file"]) in sizes]
        with tqdm(total=sum(sizes[posixpath.basename(s["file"])] for s in present), unit="B", unit_scale=True,
                  desc=f"[{split}] checking {len(shards)} shards against the manifest", dynamic_ncols=True) as bar, \
                ThreadPoolExecutor(VERIFY_THREADS) as pool:
            digests = dict(zip((s["file"] for s in present),
                               pool.map(lambda s: _sha256(fs, join(path, s["file"]), bar), present)))
        bad += [s["file"] for s in shards if digests.get(s["file"]) != s["sha256"]]
    return bad


def _sha256(fs, path: str, bar: tqdm) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def check_shards(dataset_url: str, splits: list[str]) -> None:
    """`verify_shards`, as a DatasetError naming the shards that do not match and the command that repairs them."""
    if bad := verify_shards(dataset_url, splits):
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        names = ", ".join(join(dataset_url, f) for f in bad[:3]) + more
        what = "is corrupt or missing (its sha256 differs" if len(bad) == 1 else \
            "are corrupt or missing (their sha256 differ"
        raise DatasetError(f"{names} {what} from the manifest's): {REPAIR}")


class TrainRows:
    """Full rows (seq_len + 1 tokens: seq_len inputs, seq_len targets) of the training split, shuffled per epoch
    by shard and by row.

    Each training worker reads the shards itself through fsspec (rather than through a Ray Data stream)
    because a checkpoint must pin the exact position in the data: the order is a pure function of
    (seed, position), so after a restart, on any number of workers, row `p` is the same row.
    """

    def __init__(self, dataset_url: str, seed: int = 0):
        self.url = dataset_url
        self.seed = seed
        manifest = load_manifest(dataset_url)
        self.seq_len: int = manifest["seq_len"]
        self.vocab_size: int = manifest["tokenizer"]["vocab_size"]
        shards = self.shards = manifest["splits"]["train"]["shards"]
        self.files = [s["file"] for s in shards]
        self.sizes = [s["rows"] for s in shards]
        if shards[-1]["tokens"] < shards[-1]["rows"] * (self.seq_len + 1):
            self.sizes[-1] -= 1  # the split's very last row is short: not a training row
        self.rows_per_epoch = sum(self.sizes)
        if self.rows_per_epoch == 0:
            raise DatasetError(f"{dataset_url}: no full training row of {self.seq_len + 1} tokens; prepare more data")
        self._cache: tuple[int, np.ndarray] | None = None

    @functools.lru_cache(maxsize=2)  # noqa: B019 - a few small arrays, reused for every row of an epoch
    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.files))
        return order, np.cumsum([0] + [self.sizes[i] for i in order])

    @functools.lru_cache(maxsize=4)  # noqa: B019
    def _row_order(self, epoch: int, shard: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, shard]).permutation(self.sizes[shard])

    def _shard(self, index: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != index:
            column = read_shard(self.url, self.shards[index], ["tokens"])["tokens"].combine_chunks()
            tokens = column.values.to_numpy()
            check_token_ids(tokens, self.vocab_size, self.url, self.files[index])
            tokens = tokens[: self.sizes[index] * (self.seq_len + 1)]
            self._cache = (index, tokens.reshape(self.sizes[index], self.seq_len + 1))
        return self._cache[1]

    def rows(self, position: int, count: int) -> np.ndarray:
        """Rows [position, position + count) of the endless seeded sequence, as int64 [count, seq_len + 1]."""
        out = []
        for p in range(position, position + count):
            epoch, offset = divmod(p, self.rows_per_epoch)
            order, starts = self._epoch_order(epoch)
            k = int(np.searchsorted(starts, offset, side="right")) - 1
            shard = int(order[k])
            out.append(self._shard(shard)[self._row_order(epoch, shard)[offset - starts[k]]])
        return np.stack(out).astype(np.int64)


def eval_documents(dataset_url: str, split: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Documents of an evaluation split in corpus order, pieces joined: {doc, tokens (int64), n_words, n_bytes,
    source}."""
    manifest = load_manifest(dataset_url)
    docs: dict[tuple[int, int], dict[str, Any]] = {}  # (shard, doc in the shard)
    for k, shard in enumerate(manifest["splits"][split]["shards"]):
        table = read_shard(dataset_url, shard)
        check_token_ids(pc.list_flatten(table["tokens"]).to_numpy(), manifest["tokenizer"]["vocab_size"],
                        dataset_url, shard["file"])
        table = table.to_pydict()
        for i, doc in enumerate(table["doc"]):
            if (k, doc) not in docs:
                if limit is not None and len(docs) >= limit:
                    break
                docs[k, doc] = {"doc": len(docs), "pieces": [], "n_words": table["n_words"][i],
                                "n_bytes": table["n_bytes"][i], "source": table["source"][i]}
            docs[k, doc]["pieces"].append(table["tokens"][i])
    out = []
    for d in docs.values():
        tokens = np.concatenate([np.asarray(p, dtype=np.int64) for p in d.pop("pieces")])
        out.append({**d, "tokens": tokens})
    return out


def eval_windows(dataset_url: str, split: str, seq_len: int, max_windows: int) -> np.ndarray:
    """Up to `max_windows` windows cut from the split's document stream like training rows (seq_len + 1 tokens,
    overlapping by one, so each scores seq_len targets), int64 [n, seq_len + 1]."""
    stream, have, need = [], 0, seq_len * max_windows + 1
    for doc in eval_documents(dataset_url, split):
        stream.append(doc["tokens"])
        have += len(doc["tokens"])
        if have >= need:
            break
    n = min(max_windows, max(0, have - 1) // seq_len)
    if n == 0:
        raise DatasetError(f"split {split!r} has fewer than {seq_len + 1} tokens; use a shorter length")
    tokens = np.concatenate(stream)[: n * seq_len + 1]
    return np.lib.stride_tricks.sliding_window_view(tokens, seq_len + 1)[::seq_len].copy()
