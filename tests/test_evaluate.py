"""Scoring in pieces with the state carried equals scoring each window in one full forward pass."""

import math

import numpy as np
import pytest
import torch

from models import build_model, next_token_loss
from pipeline.evaluate import metrics_at_length, score_documents

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
    torch.manual_seed(0)
    model = build_model(tiny_config(arch)).eval()
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, TINY["vocab_size"], n).astype(np.int64) for n in (70, 33, 64, 5)]
    for length in (16, 40, 1000):
        expected = reference_nll(model, docs, length)
        got = score_documents(model, docs, length, EOD, piece_tokens=7, batch_size=3, device=torch.device("cpu"))
        np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_metrics_count_every_token_word_and_byte():
    docs = [{"tokens": np.zeros(10), "n_words": 4, "n_bytes": 20}, {"tokens": np.zeros(30), "n_words": 6, "n_bytes": 60}]
    m = metrics_at_length(np.array([10.0, 30.0]), docs)
    assert m["loss"] == pytest.approx(1.0) and m["token_ppl"] == pytest.approx(math.e)
    assert m["word_ppl"] == pytest.approx(math.exp(40 / 10))
    assert m["bits_per_byte"] == pytest.approx(40 / math.log(2) / 80)
