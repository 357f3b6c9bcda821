"""The training step as the chip runs it: compiled whole, with nothing left to eager but matmuls and FFTs, and
equal to the eager step; and weights saved before its layout changed still load."""

from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch._inductor.graph as inductor_graph
from torch._functorch import config as functorch_config
from torch._inductor import config as inductor_config

from models import ModelConfig, build_model
from pipeline import checkpoint

from .seed import TEST_SEED
from .tiny import tiny_config

# The ops Inductor may hand complex tensors to: the real FFTs and the views between their spectra and the real
# arithmetic on them. Any other would be complex arithmetic falling back to eager, outside every fused kernel.
COMPLEX_OPS_ALLOWED = {torch.ops.aten._fft_r2c.default, torch.ops.aten._fft_c2r.default,
                       torch.ops.aten.view_as_real.default, torch.ops.aten.view_as_complex.default}  # fmt: skip


@contextmanager
def unsupported_type_fallbacks():
    """The ops Inductor leaves to eager because of their dtype (complex), recorded while it lowers a fresh graph
    (no cache: a cached graph is not lowered again)."""
    recorded = []
    lower = inductor_graph.fallback_node_due_to_unsupported_type

    def record(node: torch.fx.Node, *args, **kwargs) -> bool:
        falls_back = lower(node, *args, **kwargs)
        if falls_back:
            recorded.append(node.target)
        return falls_back

    with (mock.patch.object(inductor_graph, "fallback_node_due_to_unsupported_type", record),
          inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False)):
        yield recorded


def loss_and_gradients(model: torch.nn.Module, step: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    _, loss = step(ids[:, :-1], ids[:, 1:])
    loss.backward()
    return [loss.detach()] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("arch", ["gss", "dss", "transformer", "hybrid"])
def test_the_training_step_compiles_whole_and_equals_the_eager_step(arch):
    """fullgraph=True: a graph break is an error. 20 tokens cross the SSM's and the local attention's 8-token
    chunks."""
    torch._dynamo.reset()
    torch.manual_seed(TEST_SEED)
    model = build_model(tiny_config(arch))
    ids = torch.randint(0, model.cfg.vocab_size, (2, 21))
    eager = loss_and_gradients(model, model, ids)
    with unsupported_type_fallbacks() as fallbacks:
        compiled = loss_and_gradients(model, torch.compile(model, fullgraph=True), ids)
    assert set(fallbacks) <= COMPLEX_OPS_ALLOWED, set(fallbacks) - COMPLEX_OPS_ALLOWED
    if arch != "transformer":
        assert fallbacks, "no FFT was lowered: the check above saw nothing"
    for got, expected in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


# Weights written by older code (tests/data): each file holds a tiny model's weights and config, an input and the
# logits that code gave, and the message a training checkpoint of them gives on resume.
OLDER_WEIGHTS = {
    # commit da38185: GSS's `to_gate` and `to_ssm`, two Linears over the same input, now one
    "gss_before_fused_input.pt": "before GSS's input projections became one",
    # commit 1678b3f: DSS without its learned step (no `log_dt`), which now loads as a step of 1
    "dss_before_learned_step.pt": "before DSS learned its step",
}
older_weights = pytest.mark.parametrize("name", OLDER_WEIGHTS)


@older_weights
def test_weights_of_older_models_still_load_and_give_the_same_logits(name):
    saved = torch.load(Path(__file__).parent / "data" / name, weights_only=True)
    model = build_model(ModelConfig(**saved["model_config"])).eval()
    assert saved["model"].keys() != model.state_dict().keys(), "the file is not of an older layout"
    model.load_state_dict(saved["model"])  # strictly
    with torch.no_grad():
        logits, _ = model(saved["input_ids"])
    torch.testing.assert_close(logits, saved["logits"], atol=1e-6, rtol=1e-5)


@older_weights
def test_a_training_checkpoint_of_an_older_model_says_it_cannot_resume(tmp_path, name):
    """Its weights load, its optimizer state (AdamW's moments of other parameters) does not: one clear error, not
    optimizer.load_state_dict's complaint about group sizes."""
    saved = torch.load(Path(__file__).parent / "data" / name, weights_only=True)
    torch.save({"model": saved["model"], "optimizer": {}, "step": 1}, tmp_path / checkpoint.STATE)
    model = build_model(ModelConfig(**saved["model_config"]))
    with pytest.raises(ValueError, match=f"{OLDER_WEIGHTS[name]}.*start a new run name"):
        checkpoint.restore(str(tmp_path), model, torch.optim.AdamW(model.parameters()))
