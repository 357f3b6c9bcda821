"""Reading what `gss prepare` wrote: training rows in a seeded, resumable order; evaluation documents.

Each training worker reads the shards itself through fsspec (rather than through a Ray Data stream)
because a checkpoint must pin the exact position in the data: the order here is a pure function of
(seed, position), so after a restart, on any number of workers, row `p` is the same row.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pipeline.prepare import load_manifest
from pipeline.storage import filesystem, join


def _read_table(url: str, name: str, columns: list[str] | None = None):
    fs, path = filesystem(url)
    with fs.open(join(path, name), "rb") as f:
        return pq.read_table(f, columns=columns)


class TrainRows:
    """Full rows (exactly seq_len tokens) of the training split, shuffled per epoch by shard and by row."""

    def __init__(self, dataset_url: str, seed: int = 0):
        self.url = dataset_url
        self.seed = seed
        manifest = load_manifest(dataset_url)
        self.seq_len: int = manifest["seq_len"]
        shards = manifest["splits"]["train"]["shards"]
        self.files = [s["file"] for s in shards]
        self.sizes = [s["rows"] for s in shards]
        if shards[-1]["tokens"] % self.seq_len:  # the split's very last row is short: not a training row
            self.sizes[-1] -= 1
        self.rows_per_epoch = sum(self.sizes)
        if self.rows_per_epoch == 0:
            raise ValueError(f"{dataset_url}: no full training row of {self.seq_len} tokens; prepare more data")
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
            column = _read_table(self.url, self.files[index], ["tokens"])["tokens"].combine_chunks()
            tokens = column.values.to_numpy()[: self.sizes[index] * self.seq_len]
            self._cache = (index, tokens.reshape(self.sizes[index], self.seq_len))
        return self._cache[1]

    def rows(self, position: int, count: int) -> np.ndarray:
        """Rows [position, position + count) of the endless seeded sequence, as int64 [count, seq_len]."""
        out = []
        for p in range(position, position + count):
            epoch, offset = divmod(p, self.rows_per_epoch)
            order, starts = self._epoch_order(epoch)
            k = int(np.searchsorted(starts, offset, side="right")) - 1
            shard = int(order[k])
            out.append(self._shard(shard)[self._row_order(epoch, shard)[offset - starts[k]]])
        return np.stack(out).astype(np.int64)


def eval_documents(dataset_url: str, split: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Documents of an evaluation split in corpus order, pieces joined: {doc, tokens (int64), n_words, n_bytes, source}."""
    manifest = load_manifest(dataset_url)
    docs: dict[tuple[int, int], dict[str, Any]] = {}  # (shard, doc in the shard)
    for k, shard in enumerate(manifest["splits"][split]["shards"]):
        table = _read_table(dataset_url, shard["file"]).to_pydict()
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


def eval_windows(dataset_url: str, split: str, length: int, max_windows: int) -> np.ndarray:
    """Up to `max_windows` windows of `length` tokens cut from the split's document stream, int64."""
    stream, need = [], length * max_windows
    for doc in eval_documents(dataset_url, split):
        stream.append(doc["tokens"])
        if sum(map(len, stream)) >= need:
            break
    tokens = np.concatenate(stream)
    n = min(max_windows, len(tokens) // length)
    if n == 0:
        raise ValueError(f"split {split!r} has fewer than {length} tokens; use a shorter length")
    return tokens[: n * length].reshape(n, length)
