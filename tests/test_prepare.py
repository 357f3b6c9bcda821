"""`gss prepare` on a real local Ray cluster with real SentencePiece, Parquet and MLflow."""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.dataset import (
    COMPLETE,
    MANIFEST,
    DatasetError,
    dataset_dir,
    eval_documents,
    eval_windows,
    load_manifest,
    train_rows_table,
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
    assert (dataset / COMPLETE).exists() and not (dataset / "_work").exists()
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
