"""Corpus readers: PG-19 books, ArXiv JSON lines, GitHub code Parquet, and plain folders of text files.

Everything goes through fsspec, so `gs://deepmind-gutenberg`, a local copy and `memory://` in tests
are read by the same code. The corpus is cut into *units* (a group of files, one JSON-lines file, one
Parquet row group) that are read and tokenized independently, in a fixed order.

Bad input never disappears silently: a record that cannot be used becomes a `Skip` (where, why) that
the manifest lists, and a problem that affects the whole source (a missing path, a glob that matches
nothing, a missing column) is a `SourceError` raised before any work starts.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from pipeline.config import SPLITS, SourceConfig
from pipeline.storage import explain, filesystem, join

KINDS = ("pg19", "arxiv", "github", "files")

# The public layouts: PG-19 (gs://deepmind-gutenberg), the proof-pile's arxiv part, codeparrot/github-code.
DEFAULT_SPLITS: dict[str, dict[str, str]] = {
    "pg19": {"train": "train/*.txt", "validation": "validation/*.txt", "test": "test/*.txt"},
    "arxiv": {"train": "train*.jsonl*", "validation": "validation*.jsonl*", "test": "test*.jsonl*"},
    "github": {"train": "train*.parquet", "validation": "validation*.parquet", "test": "test*.parquet"},
    "files": {"train": "**/*.txt"},
}
DEFAULT_TEXT_FIELD = {"arxiv": "text", "github": "code"}


class SourceError(ValueError):
    """The source as configured cannot be read at all; the message names the file and the fix."""


@dataclass(frozen=True)
class Document:
    source: str  # where it came from: a path, path:line or path#row
    text: str


@dataclass(frozen=True)
class Skip:
    source: str
    reason: str


@dataclass
class Unit:
    """A piece of one split that is read and tokenized as a whole, in a fixed place in the split's order."""

    split: str
    index: int
    files: list[str]
    row_group: int = -1  # github: the Parquet row group; -1: whole files

    def to_dict(self) -> dict:
        return {"split": self.split, "index": self.index, "files": self.files, "row_group": self.row_group}


@dataclass
class UnitRead:
    documents: list[Document] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    filtered: int = 0  # records left out on purpose (github language/license filters)


def text_field(cfg: SourceConfig) -> str:
    return cfg.text_field or DEFAULT_TEXT_FIELD.get(cfg.kind, "")


def _excluded(path: str, root: str, patterns: list[str]) -> bool:
    relative = path.removeprefix(root.rstrip("/") + "/")
    return any(fnmatch.fnmatch(relative, pattern) for pattern in patterns)


def split_files(cfg: SourceConfig, splits: list[str]) -> dict[str, list[str]]:
    """The sorted files of each split. Raises SourceError for a missing path or an empty glob."""
    if cfg.kind not in KINDS:
        raise SourceError(f"data.source.kind={cfg.kind!r} is not one of {', '.join(KINDS)}")
    if not cfg.path:
        raise SourceError("data.source.path is empty: set it to the corpus root (a local folder or gs://...)")
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise SourceError(f"data.splits has {unknown}; splits are {', '.join(SPLITS)}")
    try:
        return _split_files(cfg, splits)
    except OSError as e:  # no bucket, no permission, no network: what the cloud says, and what to do
        raise SourceError(f"cannot read the corpus (data.source.path): {explain(cfg.path, e)}") from e


def _split_files(cfg: SourceConfig, splits: list[str]) -> dict[str, list[str]]:
    fs, root = filesystem(cfg.path, cfg.storage_options)
    if not fs.exists(root):
        raise SourceError(f"corpus path {cfg.path!r} does not exist (data.source.path)")
    globs = cfg.splits or DEFAULT_SPLITS[cfg.kind]
    holdout = [s for s in ("validation", "test") if s in splits and s not in globs]
    if holdout and not (cfg.holdout_fraction > 0 and cfg.kind in ("pg19", "files")):
        raise SourceError(
            f"no glob for split(s) {holdout} in data.source.splits (have {sorted(globs)}): add one, drop the split "
            "from data.splits, or set data.source.holdout_fraction to hold out part of the train files"
        )
    files = {}
    for split in dict.fromkeys(s for s in [*splits, *(["train"] if holdout else [])] if s not in holdout):
        pattern = join(root, globs[split])
        matched = sorted(p for p in fs.glob(pattern) if fs.isfile(p) and not _excluded(p, root, cfg.exclude))
        if not matched:
            raise SourceError(
                f"split {split!r}: {fs.unstrip_protocol(pattern)!r} matches no files (data.source.splits.{split})"
            )
        files[split] = [fs.unstrip_protocol(p) for p in matched]
    if holdout:  # hash bands of width holdout_fraction: [0, f) -> first held-out split, [f, 2f) -> second
        prefix = fs.unstrip_protocol(root)
        for split in holdout:
            files[split] = []
        train = []
        for path in files["train"]:
            slot = int(_unit_interval(path.removeprefix(prefix)) // cfg.holdout_fraction)
            (files[holdout[slot]] if slot < len(holdout) else train).append(path)
        files["train"] = train
        for split in holdout:
            if not files[split]:
                raise SourceError(f"holdout_fraction={cfg.holdout_fraction} leaves split {split!r} empty; raise it")
    return {s: files[s] for s in splits}


def _unit_interval(key: str) -> float:
    """A stable pseudo-random number in [0, 1) for a string."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64


def in_sample(source: str, fraction: float, seed: int) -> bool:
    """Deterministic sampling of documents, independent of how the work is partitioned."""
    return fraction >= 1.0 or _unit_interval(f"{seed}:{source}") < fraction


def plan_units(cfg: SourceConfig, split: str, files: list[str]) -> list[Unit]:
    fs, _ = filesystem(cfg.path, cfg.storage_options)
    units: list[Unit] = []
    if cfg.kind == "github":
        column = text_field(cfg)
        for path in files:
            schema, row_groups = _parquet_layout(fs, path)
            needed = [column] + (["language"] if cfg.languages else []) + (["license"] if cfg.licenses else [])
            missing = [c for c in needed if c not in schema]
            if missing:
                raise SourceError(
                    f"{path}: no column {missing[0]!r} (columns: {', '.join(schema)}); "
                    "set data.source.text_field to the code column, or drop the language/license filter"
                )
            units += [Unit(split, 0, [path], g) for g in range(row_groups)]
    elif cfg.kind == "arxiv":  # a compressed file cannot be split, so one unit per file
        units = [Unit(split, 0, [path]) for path in files]
    else:  # one document per file: group files into units of about unit_bytes
        sizes = fs.sizes(files)
        group: list[str] = []
        group_bytes = 0
        for path, size in zip(files, sizes):
            if group and group_bytes + (size or 0) > cfg.unit_bytes:
                units.append(Unit(split, 0, group))
                group, group_bytes = [], 0
            group.append(path)
            group_bytes += size or 0
        if group:
            units.append(Unit(split, 0, group))
    for i, unit in enumerate(units):
        unit.index = i
    return units


def _parquet_layout(fs, path: str) -> tuple[list[str], int]:
    try:
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
            return meta.schema.to_arrow_schema().names, meta.num_row_groups
    except Exception as e:
        raise SourceError(f"{path}: not a readable Parquet file ({e}); remove it or fix the split glob") from e


def read_unit(cfg: SourceConfig, unit: Unit | dict) -> UnitRead:
    """All documents of a unit in order, with every unusable record accounted for."""
    if isinstance(unit, dict):
        unit = Unit(**unit)
    fs, _ = filesystem(cfg.path, cfg.storage_options)
    out = UnitRead()
    if cfg.kind == "github":
        _read_parquet_rows(fs, cfg, unit.files[0], unit.row_group, out)
    elif cfg.kind == "arxiv":
        _read_json_lines(fs, cfg, unit.files[0], out)
    else:
        for path in unit.files:
            try:
                with fs.open(path, "rb") as f:
                    data = f.read()
            except OSError as e:
                out.skips.append(Skip(path, f"unreadable: {e}"))
                continue
            _add_text(out, path, data)
    return out


def _add_text(out: UnitRead, source: str, data: bytes | str) -> None:
    if isinstance(data, bytes):
        if b"\x00" in data:
            out.skips.append(Skip(source, "binary: contains NUL bytes"))
            return
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            out.skips.append(Skip(source, f"not UTF-8: invalid byte at offset {e.start}"))
            return
    if not data.strip():
        out.skips.append(Skip(source, "empty"))
        return
    out.documents.append(Document(source, data))


def _read_json_lines(fs, cfg: SourceConfig, path: str, out: UnitRead) -> None:
    key = text_field(cfg)
    line_no = 0
    try:
        with fs.open(path, "rb", compression="infer") as raw:
            for line_no, line in enumerate(io.BufferedReader(raw), start=1):
                source = f"{path}:{line_no}"
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as e:  # bad JSON or bad UTF-8
                    out.skips.append(Skip(source, f"malformed JSON: {e}"))
                    continue
                value = record.get(key) if isinstance(record, dict) else None
                if not isinstance(value, str):
                    why = "is not a string" if isinstance(record, dict) and key in record else "is missing"
                    out.skips.append(Skip(source, f"field {key!r} {why} (data.source.text_field)"))
                    continue
                _add_text(out, source, value)
    except (OSError, EOFError, ValueError) as e:  # corrupt compression, truncated file
        out.skips.append(Skip(f"{path}:{line_no + 1}", f"unreadable from here on: {type(e).__name__}: {e}"))


def _read_parquet_rows(fs, cfg: SourceConfig, path: str, row_group: int, out: UnitRead) -> None:
    key = text_field(cfg)
    with fs.open(path, "rb") as f:
        file = pq.ParquetFile(f)
        names = file.schema_arrow.names
        columns = [c for c in dict.fromkeys([key, "repo_name", "path", "language", "license"]) if c in names]
        table = file.read_row_group(row_group, columns=columns).to_pydict()
    languages = {x.lower() for x in cfg.languages}
    licenses = {x.lower() for x in cfg.licenses}
    start = sum(file.metadata.row_group(g).num_rows for g in range(row_group))
    for i, value in enumerate(table[key]):
        source = f"{path}#{start + i}"
        if "repo_name" in table and "path" in table:
            source += f" ({table['repo_name'][i]}/{table['path'][i]})"
        if (languages and str(table["language"][i]).lower() not in languages) or (
            licenses and str(table["license"][i]).lower() not in licenses
        ):
            out.filtered += 1
            continue
        if value is None:
            out.skips.append(Skip(source, f"column {key!r} is null"))
            continue
        _add_text(out, source, value)
