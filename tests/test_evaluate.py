"""Scoring in pieces with the state carried equals scoring each window in one full forward pass; scoring on
Ray actors equals scoring in one process."""

import math

import numpy as np
import pytest
import torch

from models import build_model, next_token_loss
from pipeline.config import load_config
from pipeline.dataset import dataset_dir, eval_documents, load_manifest
from pipeline.evaluate import (
    ClusterScorer,
    LoadedModel,
    evaluate,
    metrics_at_length,
    score_documents,
    score_windows,
    token_batches,
    window_arrays,
)

from .corpus import as_overrides, prepared, run_config
from .seed import TEST_SEED
from .tiny import TINY, tiny_config

EOD = 2


def reference_nll(model, docs: list[np.ndarray], length: int) -> np.ndarray:
    """The obvious way: each window of each document in one forward pass, contexts restarting at windows."""
    out = np.zeros(len(docs))
    for d, tokens in enumerate(docs):
        inputs = np.concatenate([[EOD], tokens[:-1]])
        for start in range(0, len(tokens), length):
            x = torch.as_tensor(inputs[None, start: start + length])
            y = torch.as_tensor(tokens[None, start: start + length])
            logits, _ = model(x)
            out[d] += next_token_loss(logits, y, reduction="sum").item()
    return out


@pytest.mark.parametrize("arch", ["gss", "dss", "transformer", "hybrid"])
def test_pieces_with_carried_state_equal_whole_windows(arch):
    model = build_model(tiny_config(arch)).eval()
    rng = np.random.default_rng(TEST_SEED)
    docs = [rng.integers(3, TINY["vocab_size"], n).astype(np.int64) for n in (70, 33, 64, 5)]
    for length in (16, 40, 1000):
        expected = reference_nll(model, docs, length)
        got = score_documents(model, docs, length, EOD, piece_tokens=7, batch_tokens=100, device=torch.device("cpu"))
        np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_metrics_count_every_token_word_and_byte():
    docs = [{"tokens": np.zeros(10), "n_words": 4, "n_bytes": 20},
            {"tokens": np.zeros(30), "n_words": 6, "n_bytes": 60}]
    m = metrics_at_length(np.array([10.0, 30.0]), docs)
    assert m["loss"] == pytest.approx(1.0) and m["token_ppl"] == pytest.approx(math.e)
    assert m["word_ppl"] == pytest.approx(math.exp(40 / 10))
    assert m["bits_per_byte"] == pytest.approx(40 / math.log(2) / 80)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, ray_cluster):
    return prepared(tmp_path_factory.mktemp("eval"), counts=(4, 2, 3), words=(300, 3000))


def test_scorer_actors_on_the_cluster_give_the_numbers_of_one_process(corpus):
    cfg = load_config(None, [*as_overrides(run_config(corpus / "out", corpus / "corpus", "base")),
                             "eval.lengths=[16, 100, 1000000]", "eval.splits=[test]", "eval.num_workers=2",
                             "eval.piece_tokens=24", "eval.batch_tokens=256"])
    manifest = load_manifest(dataset_dir(cfg))
    torch.manual_seed(TEST_SEED)
    model = build_model(tiny_config("gss", vocab_size=manifest["tokenizer"]["vocab_size"])).eval()
    rows = evaluate(cfg, LoadedModel(model, "a test model"))
    assert [(r["length"], r["capped"]) for r in rows] == [(16, False), (100, False), (1000000, True)]
    docs = eval_documents(dataset_dir(cfg), "test")
    for row in rows[:2]:
        nll = score_documents(model, [d["tokens"] for d in docs], row["length"], manifest["tokenizer"]["eod_id"],
                              piece_tokens=24, batch_tokens=256, device=torch.device("cpu"))
        assert row["loss"] == pytest.approx(nll.sum() / row["tokens"], rel=1e-6)
        assert row["tokens"] == sum(len(d["tokens"]) for d in docs) and row["documents"] == 3


@pytest.mark.parametrize("lost", [1, 2])
def test_the_batches_of_a_lost_scorer_go_to_the_one_left_or_to_a_new_one(corpus, capsys, lost):
    """A scorer lost mid-run (its node gone: here its process, killed) fails its batches: they are scored again by
    the scorers left, or by a new one when none is; every batch's sums are those of one process."""
    import ray

    cfg = load_config(None, [*as_overrides(run_config(corpus / "out", corpus / "corpus", "base")),
                             "eval.num_workers=2", "eval.piece_tokens=24"])
    manifest = load_manifest(dataset_dir(cfg))
    model = build_model(tiny_config("gss", vocab_size=manifest["tokenizer"]["vocab_size"])).eval()
    docs = [d["tokens"] for d in eval_documents(dataset_dir(cfg), "test")]
    windows = {i: window_arrays(docs, manifest["tokenizer"]["eod_id"], batch)
               for i, batch in enumerate(token_batches([len(d) for d in docs], 32, 64))}
    scored = {}
    with ClusterScorer(model, cfg) as scorers:
        for key, totals, _ in scorers.run((i, *arrays) for i, arrays in windows.items()):
            if not scored:  # the others still in flight, two on each scorer
                for actor in scorers.actors[:lost]:
                    ray.kill(actor, no_restart=True)
            scored[key] = totals
        left = list(scorers.actors)
    for actor in left:  # ended with the block, though this test still holds them
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.__ray_ready__.remote(), timeout=60)
    assert sorted(scored) == sorted(windows) and len(windows) > 8
    for i, (inputs, targets) in windows.items():
        np.testing.assert_allclose(scored[i], score_windows(model, inputs, targets, 24, torch.device("cpu")),
                                   rtol=1e-6)
    said = [line for line in capsys.readouterr().out.splitlines() if "scorer was lost" in line]
    went = ["the 1 left", "a new scorer, started once the cluster has room for it"][:lost]
    assert said == [f"[eval] a scorer was lost (ActorDiedError: its node or its process ended); its batches go to {to}"
                    for to in went]


def test_batches_hold_at_most_batch_tokens_of_one_window_size():
    batches = token_batches([70, 33, 64, 5], 16, 40)
    assert all(len({size for _, _, size in b}) == 1 and (len(b) == 1 or sum(s for _, _, s in b) <= 40)
               for b in batches)
    windows = sorted(w for b in batches for w in b)
    assert sum(size for _, _, size in windows) == 70 + 33 + 64 + 5  # every token once
    assert [b[0][2] for b in batches] == sorted((b[0][2] for b in batches), reverse=True)  # longest first
