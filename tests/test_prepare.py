"""`gss prepare` on a real local Ray cluster with real SentencePiece, Parquet and MLflow."""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.dataset import COMPLETE, MANIFEST, DatasetError, dataset_dir, eval_documents, load_manifest
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


def test_tokens_are_conserved_and_packed(prepared):
    cfg, manifest, texts = prepared
    dataset = Path(dataset_dir(cfg))
    tok = Tokenizer((dataset / "tokenizer.model").read_bytes())
    assert manifest["tokenizer"]["eod_id"] == tok.eod_id and manifest["tokenizer"]["vocab_size"] == tok.vocab_size

    # train: shard k holds unit k's documents (each followed by the end-of-document id) in full rows; the
    # rest of each unit (its tail) is in the last shard. Put back together, it is every document once, in order.
    expected = [tok.encode_document(t) for t in texts["train"]]
    train = manifest["splits"]["train"]
    shards = {s["file"]: pq.read_table(dataset / s["file"]) for s in train["shards"]}
    tails_file = f"train/shard-{len(train['unit_tail_tokens']):05d}.parquet"
    tails_table = shards.pop(tails_file).to_pydict()
    tails = np.concatenate(tails_table["tokens"])
    tail_starts = np.array([i * 128 + s for i, row in enumerate(tails_table["doc_starts"]) for s in row])
    assert len(tails) == sum(train["unit_tail_tokens"]) and len(shards) > 1
    stream, starts, offset = [], [], 0  # the split put back together, and where its documents start
    for k, tail_tokens in enumerate(train["unit_tail_tokens"]):
        table = shards.get(f"train/shard-{k:05d}.parquet")
        if table is not None:
            assert {len(r) for r in table["tokens"].to_pylist()} == {128}  # only full rows
            base = sum(map(len, stream))
            starts += [base + i * 128 + s for i, row in enumerate(table["doc_starts"].to_pylist()) for s in row]
            stream.append(np.concatenate(table["tokens"].to_numpy(zero_copy_only=False)))
        in_tail = tail_starts[(tail_starts >= offset) & (tail_starts < offset + tail_tokens)]
        starts += (in_tail - offset + sum(map(len, stream))).tolist()
        stream.append(tails[offset: offset + tail_tokens])
        offset += tail_tokens
    np.testing.assert_array_equal(np.concatenate(stream), np.concatenate(expected))
    # document boundaries recoverable: doc_starts give back every document's start
    assert starts == np.cumsum([0] + [len(e) for e in expected])[:-1].tolist()

    # evaluation splits: documents in order, long ones in pieces, word and byte counts of the whole document
    for split in ("validation", "test"):
        rows = read_split(dataset, manifest, split)
        docs = eval_documents(str(dataset), split)
        assert [d["tokens"].tolist() for d in docs] == [tok.encode_document(t).tolist() for t in texts[split]]
        assert [(d["n_words"], d["n_bytes"]) for d in docs] == [(len(t.split()), len(t.encode())) for t in texts[split]]
        assert max(map(len, rows["tokens"])) <= 1500
        assert manifest["splits"][split]["tokens"] == len(np.concatenate(rows["tokens"]))
        assert any(n > 1 for n in rows["n_pieces"])


def test_manifest_counts_and_lists_skips(prepared):
    cfg, manifest, texts = prepared
    train = manifest["splits"]["train"]
    assert train["documents"] == len(texts["train"])
    assert train["skipped"] == 2 and train["skip_reasons"] == {"empty": 1, "not UTF-8": 1}
    assert sorted(Path(s["source"]).name for s in train["skips"]) == ["5000.txt", "5001.txt"]
    assert sum(s["tokens"] for s in train["shards"]) == train["tokens"]
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
        assert counts["tokens"] == sum(s["tokens"] for s in counts["shards"])
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
