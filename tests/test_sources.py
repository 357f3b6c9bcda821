"""Corpus readers on fsspec's memory:// filesystem: layouts, bad input, clear errors. No Ray here."""

import gzip
import io
import json
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from pipeline.config import SourceConfig, load_config
from pipeline.sources import SourceError, in_sample, plan_units, read_unit, split_files


@pytest.fixture
def mem():
    root = f"memory://corpus-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    yield root, lambda rel, data: fs.pipe_file(f"{root}/{rel}", data.encode() if isinstance(data, str) else data)
    if fs.exists(root):
        fs.rm(root, recursive=True)


def read_split(cfg: SourceConfig, split: str):
    files = split_files(cfg, [split])[split]
    reads = [read_unit(cfg, u) for u in plan_units(cfg, split, files)]
    docs = [d for r in reads for d in r.documents]
    skips = [s for r in reads for s in r.skips]
    return docs, skips, sum(r.filtered for r in reads)


def test_pg19_layout_reads_books_in_order_and_counts_bad_files(mem):
    root, put = mem
    put("train/20.txt", "second book\n")
    put("train/10.txt", "first book\n")
    put("train/30.txt", b"caf\xe9 in latin-1")  # not UTF-8
    put("train/40.txt", b"\x7fELF\x00\x01binary")
    put("train/50.txt", "  \n\n")
    put("validation/1.txt", "held out\n")
    put("test/2.txt", "test book\n")
    cfg = SourceConfig(kind="pg19", path=root, unit_bytes=20)
    docs, skips, _ = read_split(cfg, "train")
    assert [d.text for d in docs] == ["first book\n", "second book\n"]
    reasons = {s.source.rsplit("/", 1)[1]: s.reason for s in skips}
    assert reasons["30.txt"].startswith("not UTF-8: invalid byte at offset 3")
    assert reasons["40.txt"].startswith("binary")
    assert reasons["50.txt"] == "empty"
    assert len(plan_units(cfg, "train", split_files(cfg, ["train"])["train"])) > 1  # grouped by unit_bytes


def test_arxiv_json_lines_gzip_and_zstd_with_malformed_lines(mem):
    root, put = mem
    lines = [json.dumps({"text": "\\section{A} x^2", "meta": {}}), "{not json", json.dumps({"meta": 1}),
             json.dumps({"text": 5}), "", json.dumps({"text": "\\begin{proof} ok \\end{proof}"})]
    data = ("\n".join(lines) + "\n").encode()
    put("train.jsonl.gz", gzip.compress(data))
    put("validation.jsonl.zst", zstandard.ZstdCompressor().compress(data))
    put("test.jsonl", data)
    cfg = SourceConfig(kind="arxiv", path=root)
    for split in ("train", "validation", "test"):
        docs, skips, _ = read_split(cfg, split)
        assert [d.text for d in docs] == ["\\section{A} x^2", "\\begin{proof} ok \\end{proof}"]
        assert [s.source.rsplit(":", 1)[1] for s in skips] == ["2", "3", "4"]
        assert skips[0].reason.startswith("malformed JSON")
        assert "'text' is missing" in skips[1].reason and "'text' is not a string" in skips[2].reason


def test_arxiv_truncated_gzip_keeps_what_was_read_and_reports_the_rest(mem):
    root, put = mem
    data = gzip.compress(b"".join(json.dumps({"text": f"doc {i} " * 50}).encode() + b"\n" for i in range(200)))
    put("train.jsonl.gz", data[: len(data) // 2])
    docs, skips, _ = read_split(SourceConfig(kind="arxiv", path=root), "train")
    assert 0 < len(docs) < 200
    assert len(skips) == 1 and skips[0].reason.startswith("unreadable from here on")


def parquet_bytes(table: pa.Table, row_group_size: int) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size)
    return buf.getvalue()


def test_github_parquet_row_groups_filters_and_nulls(mem):
    root, put = mem
    table = pa.table({
        "code": ["int main() {}\n", None, "def f():\n\treturn 1\n", "fn main() {}\n", "   "],
        "repo_name": ["a/b"] * 5, "path": ["m.c", "n.c", "f.py", "m.rs", "e.py"],
        "language": ["C", "C", "Python", "Rust", "Python"], "license": ["mit", "mit", "apache-2.0", "mit", "mit"],
    })
    put("train-0.parquet", parquet_bytes(table, row_group_size=2))
    cfg = SourceConfig(kind="github", path=root, splits={"train": "train-*.parquet"}, languages=["c", "python"])
    assert len(plan_units(cfg, "train", split_files(cfg, ["train"])["train"])) == 3
    docs, skips, filtered = read_split(cfg, "train")
    assert [d.text for d in docs] == ["int main() {}\n", "def f():\n\treturn 1\n"]
    assert filtered == 1  # the Rust file
    assert [s.reason for s in skips] == ["column 'code' is null", "empty"]
    assert "#1 (a/b/n.c)" in skips[0].source


def test_github_missing_column_is_a_clear_error(mem):
    root, put = mem
    put("train.parquet", parquet_bytes(pa.table({"content": ["x"]}), 10))
    cfg = SourceConfig(kind="github", path=root, splits={"train": "train.parquet"})
    with pytest.raises(SourceError, match="no column 'code'.*content.*text_field"):
        plan_units(cfg, "train", split_files(cfg, ["train"])["train"])


def test_missing_path_empty_glob_and_missing_split_are_clear_errors(mem):
    root, put = mem
    with pytest.raises(SourceError, match="does not exist"):
        split_files(SourceConfig(kind="pg19", path=f"{root}/nowhere"), ["train"])
    put("train/1.txt", "x")
    with pytest.raises(SourceError, match="'validation'.*matches no files"):
        split_files(SourceConfig(kind="pg19", path=root), ["train", "validation"])
    with pytest.raises(SourceError, match="no glob for split"):
        split_files(SourceConfig(kind="files", path=root, splits={"train": "**/*.txt"}), ["train", "test"])
    with pytest.raises(SourceError, match="path is empty"):
        split_files(SourceConfig(kind="pg19"), ["train"])


def test_holdout_splits_files_by_a_stable_hash(mem):
    root, put = mem
    for i in range(200):
        put(f"src/m{i}.py", f"x = {i}\n")
    cfg = SourceConfig(kind="files", path=root, splits={"train": "src/*.py"}, holdout_fraction=0.1)
    files = split_files(cfg, ["train", "validation", "test"])
    assert sum(map(len, files.values())) == 200
    assert not set(files["train"]) & (set(files["validation"]) | set(files["test"]))
    assert 5 < len(files["validation"]) < 40 and 5 < len(files["test"]) < 40
    assert files == split_files(cfg, ["train", "validation", "test"])


def test_sampling_is_deterministic_and_about_the_fraction():
    picked = [in_sample(f"doc{i}", 0.25, seed=1) for i in range(4000)]
    assert picked == [in_sample(f"doc{i}", 0.25, seed=1) for i in range(4000)]
    assert 850 < sum(picked) < 1150
    assert picked != [in_sample(f"doc{i}", 0.25, seed=2) for i in range(4000)]


def test_dataset_identity_counts_only_settings_that_differ_from_defaults(tmp_path):
    from pipeline.dataset import data_identity, dataset_dir

    base = [f"root={tmp_path}", "data.source.path=/corpus"]
    identity = data_identity(load_config(None, base))
    # a setting added later with a neutral default does not move existing datasets
    assert "exclude" not in identity["source"] and "pack" not in identity
    assert dataset_dir(load_config(None, base)) == dataset_dir(load_config(None, [*base, "data.num_actors=7"]))
    assert dataset_dir(load_config(None, base)) != dataset_dir(load_config(None, [*base, "data.source.exclude=[a/*]"]))
    assert dataset_dir(load_config(None, base)) != dataset_dir(load_config(None, [*base, "data.pack.seq_len=64"]))
