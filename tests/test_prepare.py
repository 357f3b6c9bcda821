"""`gss prepare` on a real local Ray cluster with real SentencePiece, Parquet and MLflow."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import RunConfig, load_config
from pipeline.dataset import (
    COMPLETE,
    MANIFEST,
    DatasetError,
    TrainRows,
    dataset_dir,
    eval_documents,
    eval_windows,
    load_manifest,
    parquet_bytes,
    train_rows_table,
    verify_shards,
)
from pipeline.prepare import PrepareError, prepare, prepare_stage
from pipeline.tokenizer import Tokenizer
from tests.corpus import shared_corpus, write_arxiv, write_pg19

SMALL = ["data.tokenizer.vocab_size=400", "data.pack.seq_len=128", "data.source.unit_bytes=20000",
         "data.pack.eval_piece_tokens=1500", "data.num_actors=2"]  # fmt: skip


def config(root: Path, corpus: Path, *overrides: str, kind: str = "pg19"):
    return load_config(None, [f"root={root}", f"data.source.path={corpus}", f"data.source.kind={kind}", *SMALL,
                              *overrides])


def read_split(dataset: Path, manifest: dict, split: str) -> dict:
    tables = [pq.read_table(dataset / s["file"]) for s in manifest["splits"][split]["shards"]]
    return {k: [v for t in tables for v in t[k].to_pylist()] for k in tables[0].column_names}


def all_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def books(tmp_path_factory):
    root = tmp_path_factory.mktemp("pg19")
    texts = write_pg19(root, counts=(9, 2, 2))
    (root / "train" / "5000.txt").write_bytes(b"caf\xe9 latin-1 text")  # skipped: not UTF-8
    (root / "train" / "5001.txt").write_bytes(b"")  # skipped: empty
    return root, texts


@pytest.fixture(scope="module")
def prepared(ray_cluster, books, tmp_path_factory):
    corpus, texts = books
    cfg = config(tmp_path_factory.mktemp("out"), corpus)
    manifest = prepare(cfg)
    return cfg, manifest, texts


def test_train_rows_overlap_by_one_token_and_list_document_starts_where_they_are_inputs():
    stream = np.arange(100, 111, dtype=np.int32)
    table = train_rows_table(stream, np.array([0, 3, 4, 8]), seq_len=4).to_pydict()
    assert table["tokens"] == [[100, 101, 102, 103, 104], [104, 105, 106, 107, 108], [108, 109, 110]]
    assert table["doc_starts"] == [[0, 3], [0], [0]]  # 4 and 8 are inputs in the next row, not in this one's last
    exact = train_rows_table(stream[:9], np.array([0, 3, 4]), seq_len=4).to_pydict()  # 2·4 + 1: no short row
    assert exact["tokens"] == table["tokens"][:2] and exact["doc_starts"] == [[0, 3], [0]]
    assert train_rows_table(stream[:0], np.zeros(0, np.int64), seq_len=4).num_rows == 0


def joined(rows: list) -> np.ndarray:
    """Rows that overlap by one token put back together: each row after the first without its first token."""
    return np.concatenate([rows[0], *(r[1:] for r in rows[1:])])


def test_tokens_are_conserved_and_packed(prepared):
    cfg, manifest, texts = prepared
    dataset = Path(dataset_dir(cfg))
    tok = Tokenizer((dataset / "tokenizer.model").read_bytes())
    assert manifest["tokenizer"]["eod_id"] == tok.eod_id and manifest["tokenizer"]["vocab_size"] == tok.vocab_size

    # train: each unit's documents (each followed by the end-of-document id) as rows of L + 1 tokens overlapping
    # by one; shard k holds unit k's full rows, the last shard the units' tails (from the last full row's last
    # token on) in unit order, cut the same way. Put back together, it is every document once, in order.
    L = cfg.data.pack.seq_len
    documents = [tok.encode_document(t) for t in texts["train"]]
    corpus = np.concatenate(documents)
    train = manifest["splits"]["train"]
    tail_tokens = train["unit_tail_tokens"]
    tables = {s["file"]: pq.read_table(dataset / s["file"]).to_pydict() for s in train["shards"]}
    tails = tables.pop(f"train/shard-{len(tail_tokens):05d}.parquet")
    shards = [tables.get(f"train/shard-{k:05d}.parquet", {"tokens": [], "doc_starts": []})
              for k in range(len(tail_tokens))]
    units = [[np.array(r) for r in shard["tokens"]] for shard in shards]  # unit k's full rows
    tail_rows = [np.array(r) for r in tails["tokens"]]
    assert {len(r) for rows in units for r in rows} == {L + 1} and sum(map(bool, units)) > 1  # full rows only
    assert {len(r) for r in tail_rows[:-1]} == {L + 1} and 2 <= len(tail_rows[-1]) <= L + 1

    tail_stream = joined(tail_rows)
    tail_at = np.cumsum([0] + tail_tokens)  # where each unit's tail begins in the tails shard
    assert len(tail_stream) == tail_at[-1]
    pieces, base, tail_pos = [], [], np.zeros(len(tail_stream), int)  # base: where unit k begins in the split
    for k, rows in enumerate(units):
        base.append(sum(map(len, pieces)))
        tail = tail_stream[tail_at[k]: tail_at[k + 1]]
        if rows:
            assert tail[0] == rows[-1][-1]  # the tail repeats the last row's last token
        pieces += [joined(rows), tail[1:]] if rows else [tail]
        tail_pos[tail_at[k]: tail_at[k + 1]] = base[k] + len(rows) * L + np.arange(len(tail))
    np.testing.assert_array_equal(np.concatenate(pieces), corpus)

    # where every stored row sits in the split, and where its documents start (listed once, where an input)
    placed = [(base[k] + j * L + np.arange(L + 1), row, starts) for k, rows in enumerate(units)
              for j, (row, starts) in enumerate(zip(rows, shards[k]["doc_starts"]))]
    placed += [(tail_pos[j * L: j * L + len(row)], row, starts)
               for j, (row, starts) in enumerate(zip(tail_rows, tails["doc_starts"]))]
    doc_starts = []
    for pos, row, starts in placed:
        np.testing.assert_array_equal(corpus[pos], row)
        assert all(s < L for s in starts)
        doc_starts += pos[starts].tolist()
    assert sorted(doc_starts) == np.cumsum([0] + [len(d) for d in documents])[:-1].tolist()

    # what training sees: every token an input once and a target once, but for the per-unit cut and the short row
    inputs, targets = np.zeros(len(corpus), int), np.zeros(len(corpus), int)
    for pos, row, _ in placed:
        if len(row) == L + 1:
            inputs[pos[:-1]] += 1
            targets[pos[1:]] += 1
    full_tail_rows = sum(len(r) == L + 1 for r in tail_rows)
    end = tail_pos[full_tail_rows * L:]  # the tails shard from its short last row on
    assert set(np.flatnonzero(inputs != 1)) == set(end) and not inputs[end].any()
    expected = np.ones(len(corpus), int)
    expected[end[1:]] = 0  # the short last row trains nothing
    for k, rows in enumerate(units):
        if rows and base[k]:
            expected[base[k]] = 0  # no row holds a unit's first token after the previous unit's last
        if rows:  # its tail's first token: also a target in the tails shard, after the previous tail
            expected[base[k] + len(rows) * L] = 1 + (0 < tail_at[k] <= full_tail_rows * L)
    expected[0] = 0
    np.testing.assert_array_equal(targets, expected)
    assert (expected == 2).sum() > 1

    # evaluation splits: documents in order, long ones in pieces, word and byte counts of the whole document
    for split in ("validation", "test"):
        rows = read_split(dataset, manifest, split)
        docs = eval_documents(str(dataset), split)
        assert [d["tokens"].tolist() for d in docs] == [tok.encode_document(t).tolist() for t in texts[split]]
        assert [(d["n_words"], d["n_bytes"]) for d in docs] == [(len(t.split()), len(t.encode())) for t in texts[split]]
        assert max(map(len, rows["tokens"])) <= 1500
        assert manifest["splits"][split]["tokens"] == len(np.concatenate(rows["tokens"]))
        assert any(n > 1 for n in rows["n_pieces"])


def test_eval_windows_are_cut_like_training_rows(prepared):
    cfg, _, _ = prepared
    dataset = dataset_dir(cfg)
    stream = np.concatenate([d["tokens"] for d in eval_documents(dataset, "validation")])
    windows = eval_windows(dataset, "validation", 128, 3)
    assert windows.shape == (3, 129) and windows.dtype == np.int64
    np.testing.assert_array_equal(joined(list(windows)), stream[: 3 * 128 + 1])
    assert eval_windows(dataset, "validation", len(stream) - 1, 5).shape == (1, len(stream))
    with pytest.raises(DatasetError, match="fewer than"):
        eval_windows(dataset, "validation", len(stream), 1)


def test_manifest_counts_and_lists_skips(prepared):
    cfg, manifest, texts = prepared
    train = manifest["splits"]["train"]
    assert train["documents"] == len(texts["train"])
    assert train["skipped"] == 2 and train["skip_reasons"] == {"empty": 1, "not UTF-8": 1}
    assert sorted(Path(s["source"]).name for s in train["skips"]) == ["5000.txt", "5001.txt"]
    # every training row but the split's last shares its last token with the next row or its unit's tail
    assert sum(s["tokens"] for s in train["shards"]) == train["tokens"] + train["rows"] - 1
    assert train["words"] == 0  # words are counted where word-level perplexity needs them: validation, test
    assert manifest["splits"]["test"]["words"] == sum(len(t.split()) for t in texts["test"])
    dataset = Path(dataset_dir(cfg))
    assert (dataset / COMPLETE).exists() and not (dataset / "_work" / "units").exists()
    assert len(list((dataset / "_work" / "tails").iterdir())) == len(train["unit_tail_tokens"])  # kept for repairs
    assert load_manifest(str(dataset))["splits"] == manifest["splits"]


def test_rerun_does_nothing_and_a_new_config_is_a_new_version(prepared):
    cfg, _, _ = prepared
    dataset = Path(dataset_dir(cfg))
    before = all_files(dataset)
    again = prepare(cfg)
    assert again["stats"]["skipped"] and all_files(dataset) == before
    other = load_config(None, [f"root={cfg.root}", f"data.source.path={cfg.data.source.path}", *SMALL,
                               "data.pack.seq_len=64", "data.tokenizer.path=" + str(dataset / "tokenizer.model")])
    assert dataset_dir(other) != dataset_dir(cfg)
    prepare(other)
    assert all_files(dataset) == before  # the old version is untouched
    assert set(pq.read_table(Path(dataset_dir(other)) / "train/shard-00000.parquet")["tokens"].to_pylist()[0]) != set()


def test_interrupted_run_resumes_to_the_same_bytes(prepared, tmp_path):
    cfg, _, _ = prepared
    reference = all_files(Path(dataset_dir(cfg)))

    resumed = load_config(None, [f"root={tmp_path}", f"data.source.path={cfg.data.source.path}", *SMALL])
    finished = []

    def stop_after_two_shards(result: dict) -> None:
        finished.append(result)
        if len(finished) == 2:
            raise KeyboardInterrupt  # as if the job were stopped between shards

    with pytest.raises(KeyboardInterrupt):
        prepare(resumed, on_item=stop_after_two_shards)
    dataset = Path(dataset_dir(resumed))
    assert not (dataset / COMPLETE).exists() and not (dataset / MANIFEST).exists()
    written = sorted(p.name for p in dataset.glob("train/shard-*.parquet"))
    assert 2 <= len(written) < len(reference) and (dataset / "_work").exists()

    done = {(r["split"], r["index"]) for r in finished}
    finished.clear()
    prepare(resumed, on_item=finished.append)
    assert finished and not done & {(r["split"], r["index"]) for r in finished}  # no unit done twice
    assert all_files(dataset) == reference


def test_no_usable_documents_is_an_error_and_not_complete(ray_cluster, tmp_path):
    corpus = tmp_path / "bad"
    for split in ("train", "validation", "test"):
        (corpus / split).mkdir(parents=True)
        (corpus / split / "1.txt").write_bytes(b"\x00\x01binary")
    cfg = config(tmp_path / "out", corpus, "data.tokenizer.path=unused")
    with pytest.raises(DatasetError, match="does not exist"):
        prepare(cfg)
    cfg = config(tmp_path / "out", corpus)
    with pytest.raises(PrepareError, match="no training text"):
        prepare(cfg)
    assert not (Path(dataset_dir(cfg)) / COMPLETE).exists()


def test_arxiv_stage_is_tracked_in_mlflow(ray_cluster, tmp_path):
    import mlflow

    corpus = tmp_path / "arxiv"
    corpus.mkdir()
    docs = [{"text": f"\\begin{{theorem}}\\label{{t{i}}} Let $x_{i} \\in X$. " * 30 + "\\end{theorem}\n"}
            for i in range(40)]
    write_arxiv(corpus / "train.jsonl.gz", docs[:30] + ["{broken"])
    write_arxiv(corpus / "validation.jsonl.gz", docs[30:35])
    write_arxiv(corpus / "test.jsonl.gz", docs[35:])
    cfg = config(tmp_path / "out", corpus, "name=arx", kind="arxiv")
    manifest = prepare_stage(cfg)
    assert manifest["splits"]["train"]["skip_reasons"] == {"malformed JSON": 1}

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["gss"], output_format="list")
    assert [r.info.run_name for r in runs] == ["arx/prepare"]
    run = runs[0]
    assert run.data.params["data.pack.seq_len"] == "128"
    assert run.data.metrics["train.documents"] == 30 and run.data.metrics["train.skipped"] == 1
    assert run.data.metrics["tokens_per_second"] > 0
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"manifest.json", "tokenizer.model"} <= artifacts


@pytest.mark.parametrize("kind", ["pg19", "arxiv", "github"])
def test_shared_corpora(ray_cluster, tmp_path, kind):
    corpus = shared_corpus(kind)
    cfg = load_config(None, [f"root={tmp_path}", f"data.source.path={corpus}", f"data.source.kind={kind}",
                             "data.tokenizer.vocab_size=1000", "data.tokenizer.sample_bytes=2000000",
                             "data.pack.seq_len=1024", "data.source.unit_bytes=4000000"])
    manifest = prepare(cfg)
    for split, counts in manifest["splits"].items():
        assert counts["documents"] > 0 and set(counts["skip_reasons"]) <= {"empty"}, (split, counts)
        overlaps = counts["rows"] - 1 if split == "train" else 0  # training rows share a token with the next
        assert counts["tokens"] + overlaps == sum(s["tokens"] for s in counts["shards"])
    tok = Tokenizer((Path(dataset_dir(cfg)) / "tokenizer.model").read_bytes())
    row = read_split(Path(dataset_dir(cfg)), manifest, "test")["tokens"][0]
    assert tok.decode(row) and tok.sp.unk_id() not in row  # byte fallback: nothing maps to <unk>


def test_tokenizer_sample_is_the_same_wherever_the_corpus_lives(books, tmp_path):
    import json
    import shutil

    from pipeline.config import to_dict
    from pipeline.prepare import _sample_documents
    from pipeline.sources import plan_units, split_files

    corpus, _ = books
    shutil.copytree(corpus, tmp_path / "copy")
    samples = []
    for path in (corpus, tmp_path / "copy"):
        source = config(tmp_path, path).data.source
        units = plan_units(source, "train", split_files(source, ["train"])["train"])
        batch = {"item": [json.dumps(u.to_dict()) for u in units]}
        samples.append(_sample_documents(batch, to_dict(source), fraction=0.3, seed=0)["text"])
    assert samples[0] == samples[1] and 0 < len(samples[0])
    everything = _sample_documents(batch, to_dict(source), fraction=1.0, seed=0)["text"]
    assert 0.15 < len(samples[0]) / len(everything) < 0.45  # pieces, not whole books: close to the fraction


# ---------------------------------------------------------------------------------------------------
# Shard faults (issue 33): copies of the prepared dataset, damaged


REPAIR = "run `gss prepare` with the same config, which rewrites the shards that do not match"
SPLITS = ["train", "validation", "test"]


def damaged_copy(cfg: RunConfig, root: Path) -> tuple[RunConfig, Path]:
    """The prepared dataset copied to where the same data config under `root` finds it: (that config, its folder)."""
    copy = config(root, Path(cfg.data.source.path))
    shutil.copytree(dataset_dir(cfg), dataset_dir(copy))
    return copy, Path(dataset_dir(copy))


def corrupt(path: Path) -> None:
    """4 KiB (or the whole of a smaller file) inverted in the middle of the file, as issue 33 found a shard."""
    data = bytearray(path.read_bytes())
    start = max(0, len(data) // 2 - 2048)
    data[start: start + 4096] = bytes(b ^ 0xFF for b in data[start: start + 4096])
    path.write_bytes(bytes(data))


def edit_manifest(dataset: Path, edit) -> None:
    """`edit` applied to the manifest, written as `gss prepare` writes it."""
    manifest = json.loads((dataset / MANIFEST).read_text())
    edit(manifest)
    (dataset / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def replace_shard(dataset: Path, file: str, data: bytes) -> None:
    """Shard `file` replaced by `data`, its manifest sha256 made to match."""
    (dataset / file).write_bytes(data)

    def new_digest(manifest: dict) -> None:
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                if shard["file"] == file:
                    shard["sha256"] = hashlib.sha256(data).hexdigest()

    edit_manifest(dataset, new_digest)


def as_written(path: Path) -> pa.Table:
    """A shard's table as `gss prepare` built it: Parquet reads its lists' items back named "element"."""
    table = pq.read_table(path)
    return table.cast(pa.schema([(f.name, pa.list_(f.type.value_type)) if pa.types.is_list(f.type) else f
                                 for f in table.schema]))


def all_rows(dataset: Path) -> np.ndarray:
    rows = TrainRows(str(dataset))
    return rows.rows(0, rows.rows_per_epoch)


def test_page_checksums_find_a_flipped_byte_and_files_without_them_still_read():
    table = train_rows_table(np.arange(5000, dtype=np.int32) % 400, np.zeros(0, np.int64), 128)
    with_checksums, without = parquet_bytes(table, page_checksum=True), parquet_bytes(table, page_checksum=False)
    column = pq.ParquetFile(pa.BufferReader(with_checksums)).metadata.row_group(0).column(0)
    flipped = bytearray(with_checksums)
    flipped[column.data_page_offset + column.total_compressed_size - 1] ^= 1  # the last byte of the page's data
    with pytest.raises(OSError, match="CRC checksum verification failed"):
        pq.read_table(pa.BufferReader(bytes(flipped)), page_checksum_verification=True)
    assert pq.read_table(pa.BufferReader(without), page_checksum_verification=True).equals(table)


def test_a_corrupt_shard_is_refused_by_its_readers_and_rewritten_byte_for_byte(prepared, tmp_path, capsys):
    """A training unit's shard, an evaluation shard and the tails shard, 4 KiB of each flipped: every reader refuses
    with one line naming the shard, and `gss prepare` rewrites the three, every file of the dataset as it was."""
    import mlflow

    from models import build_model
    from pipeline.evaluate import LoadedModel, evaluate
    from tests.tiny import tiny_config

    cfg, manifest, _ = prepared
    copy, dataset = damaged_copy(cfg, tmp_path)
    reference = all_files(dataset)
    train, validation = (manifest["splits"][split]["shards"] for split in ("train", "validation"))
    damaged = [train[1]["file"], train[-1]["file"], validation[0]["file"]]  # a unit's shard, the tails, eval
    for file in damaged:
        corrupt(dataset / file)

    with pytest.raises(DatasetError) as error:
        all_rows(dataset)
    assert str(error.value) in [f"{dataset / f} is corrupt (its sha256 differs from the manifest's): {REPAIR}"
                                for f in damaged[:2]]  # whichever of the two the seeded order reaches first
    with pytest.raises(DatasetError) as error:
        eval_documents(str(dataset), "validation")
    assert str(error.value) == f"{dataset / damaged[2]} is corrupt (its sha256 differs from the manifest's): {REPAIR}"
    model = LoadedModel(build_model(tiny_config("gss", vocab_size=manifest["tokenizer"]["vocab_size"])), "tiny")
    with pytest.raises(DatasetError) as error:  # `gss eval`: before any scorer starts
        evaluate(copy, model, {"validation": [128]})
    assert str(error.value) == f"{dataset / damaged[2]} is corrupt or missing (its sha256 differs from the " \
                               f"manifest's): {REPAIR}"
    assert verify_shards(str(dataset), SPLITS) == damaged

    stats = prepare_stage(copy)["stats"]
    said = capsys.readouterr().out
    for file in damaged:
        assert f"[prepare] rewrote {file} (its sha256 differed from the manifest's)\n" in said
    shards = sum(len(s["shards"]) for s in manifest["splits"].values())
    assert f"(already complete: {shards - 3} of {shards} shards matched the manifest, 3 rewritten)" in said
    assert stats["repaired_shards"] == 3 and not stats["skipped"]
    assert all_files(dataset) == reference
    assert len(all_rows(dataset)) == TrainRows(str(dataset)).rows_per_epoch
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = mlflow.search_runs(experiment_names=["gss"], output_format="list")
    assert run.data.metrics["repaired_shards"] == 3

    again = prepare(copy)["stats"]  # every shard matches: checked, nothing written
    assert again["skipped"] and again["repaired_shards"] == 0 and list(again["stage_seconds"]) == ["verify"]


def test_a_shard_that_matches_the_manifest_but_was_written_wrong_is_refused(prepared, tmp_path):
    """A shard whose bytes are the ones the manifest names, but not a usable shard (ids outside the vocabulary, a
    page that fails its checksum): the readers refuse it, and say that a repair cannot help."""
    cfg, manifest, _ = prepared
    _, dataset = damaged_copy(cfg, tmp_path)
    vocab = manifest["tokenizer"]["vocab_size"]
    remake = f"though its sha256 matches the manifest's: the dataset was written wrong; delete {dataset} and run " \
             "`gss prepare` with the same config to make it anew"
    train = manifest["splits"]["train"]["shards"][0]["file"]
    table = as_written(dataset / train)
    tokens = table["tokens"].combine_chunks()
    values = tokens.values.to_numpy().copy()
    values[7] = vocab
    replace_shard(dataset, train, parquet_bytes(table.set_column(0, "tokens", pa.ListArray.from_arrays(
        tokens.offsets, pa.array(values))), page_checksum=True))
    with pytest.raises(DatasetError) as error:
        all_rows(dataset)
    assert str(error.value) == f"{dataset / train} holds token id {vocab}, outside the vocabulary [0, {vocab}), " \
                               f"{remake}"

    validation = manifest["splits"]["validation"]["shards"][0]["file"]
    data = bytearray((dataset / validation).read_bytes())
    column = pq.ParquetFile(dataset / validation).metadata.row_group(0).column(3)  # tokens
    data[column.data_page_offset + column.total_compressed_size - 1] ^= 1
    replace_shard(dataset, validation, bytes(data))
    with pytest.raises(DatasetError, match=r"cannot be read \(could not verify page integrity, CRC checksum") as error:
        eval_documents(str(dataset), "validation")
    assert str(error.value).startswith(str(dataset / validation)) and str(error.value).endswith(remake)


def test_a_dataset_from_before_page_checksums_still_reads_and_is_repaired_to_its_own_format(prepared, tmp_path):
    """A dataset `gss prepare` wrote before it recorded `shard_format`: shards without page checksums, no kept
    tails. It reads as before; a repaired shard is written as its others were (the tails shard's units tokenized
    again for their tails)."""
    cfg, _, _ = prepared
    copy, dataset = damaged_copy(cfg, tmp_path)

    def old_format(manifest: dict) -> None:
        del manifest["shard_format"]
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                data = parquet_bytes(as_written(dataset / shard["file"]), page_checksum=False)
                (dataset / shard["file"]).write_bytes(data)
                shard["sha256"] = hashlib.sha256(data).hexdigest()

    edit_manifest(dataset, old_format)
    shutil.rmtree(dataset / "_work")
    old = all_files(dataset)
    assert len(all_rows(dataset)) and eval_documents(str(dataset), "test")
    train = load_manifest(str(dataset))["splits"]["train"]["shards"]
    for file in (train[0]["file"], train[-1]["file"]):  # a unit's shard and the tails shard
        corrupt(dataset / file)
    assert prepare(copy)["stats"]["repaired_shards"] == 2
    assert {name: data for name, data in all_files(dataset).items() if not name.startswith("_work")} == old


def test_training_refuses_a_corrupt_shard_before_any_worker_starts(prepared, tmp_path):
    from pipeline.train import train_stage

    cfg, manifest, _ = prepared
    _, dataset = damaged_copy(cfg, tmp_path)
    validation = manifest["splits"]["validation"]["shards"][-1]["file"]  # what the workers' validation reads
    corrupt(dataset / validation)
    with pytest.raises(DatasetError) as error:
        train_stage(config(tmp_path, Path(cfg.data.source.path), "name=refused"))
    assert str(error.value) == f"{dataset / validation} is corrupt or missing (its sha256 differs from the " \
                               f"manifest's): {REPAIR}"
    assert not [p for p in (tmp_path / "train").rglob("*") if p.is_file()]  # no checkpoint, no lease left
