"""Model-level contracts for every architecture: shapes, causality, recurrent decoding, kernels."""

import dataclasses

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from models import ARCHS, PRESETS, ModelConfig, build_model, next_token_loss
from models import model as model_module

from .seed import TEST_SEED
from .tiny import tiny_config

LENGTH = 21  # crosses SSM chunks (8) and hybrid attention chunks (8) and ends mid-chunk


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shape_and_causality(arch):
    model = build_model(tiny_config(arch)).eval()
    ids = torch.randint(0, 97, (2, LENGTH))
    logits, loss = model(ids)
    assert logits.shape == (2, LENGTH, 97) and loss is None
    for t in (0, 7, 8, 15):
        changed = ids.clone()
        changed[:, t + 1 :] = torch.randint(0, 97, changed[:, t + 1 :].shape)
        changed_logits, _ = model(changed)
        torch.testing.assert_close(changed_logits[:, : t + 1], logits[:, : t + 1], atol=1e-5, rtol=0)
        assert not torch.allclose(changed_logits[:, t + 1 :], logits[:, t + 1 :])


def test_loss_is_the_mean_negative_log_likelihood_of_the_targets():
    model = build_model(tiny_config("gss")).eval()
    ids, targets = torch.randint(0, 97, (2, 2, LENGTH))
    logits, _ = model(ids)
    no_logits, loss = model(ids, targets)  # the chunked loss: the logits are never made
    assert no_logits is None
    nll = -torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    per_token = next_token_loss(logits, targets, reduction="none")
    assert per_token.shape == (2, LENGTH)
    torch.testing.assert_close(per_token, nll)
    torch.testing.assert_close(loss, nll.mean())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(ids, targets)[1].dtype == torch.float32


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel", ["fft", "chunked"])
def test_step_matches_parallel_forward(arch, kernel):
    model = build_model(tiny_config(arch, ssm_kernel=kernel)).double().eval()
    ids = torch.randint(0, 97, (3, LENGTH))
    parallel, _ = model(ids)
    state = model.start_decoding(model.init_state(3), capacity=LENGTH)
    stepped = [model.step(ids[:, t], state) for t in range(LENGTH)]
    torch.testing.assert_close(torch.stack(stepped, 1), parallel)
    # a prompt read in parallel pieces hands the same state to recurrent decoding
    state = model.init_state(3)
    first, state = model.prefill(ids[:, :5], state)
    second, state = model.prefill(ids[:, 5:19], state)
    torch.testing.assert_close(torch.cat([first, second], 1), parallel[:, :19])
    decoding = model.start_decoding(state, capacity=LENGTH)
    for t in (19, 20):
        torch.testing.assert_close(model.step(ids[:, t], decoding), parallel[:, t])


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generate_equals_repeated_full_forwards(arch):
    model = build_model(tiny_config(arch)).double().eval()
    prompt = torch.randint(0, 97, (2, 11))
    out = model.generate(prompt, max_new_tokens=9, temperature=0.0)
    assert out.shape == (2, 20)
    expected = prompt
    for _ in range(9):
        expected = torch.cat([expected, model(expected)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("arch", ["gss", "dss", "hybrid"])
def test_a_decode_computes_the_ssm_step_constants_once(arch, monkeypatch):
    from models.ssm import DiagonalSSM

    calls = []
    modes = DiagonalSSM.modes
    monkeypatch.setattr(DiagonalSSM, "modes", lambda self: calls.append(self) or modes(self))
    model = build_model(tiny_config(arch)).eval()
    ssm_layers = sum(isinstance(m, DiagonalSSM) for m in model.modules())
    tokens = list(model.stream(torch.randint(0, 97, (2, 11)), max_new_tokens=9, temperature=0.0))
    assert len(tokens) == 9 and tokens[0].shape == (2,)
    assert len(calls) == 2 * ssm_layers  # once in the prompt's parallel pass, once for the 8 steps


def test_sampling_respects_top_k():
    model = build_model(tiny_config("gss")).eval()
    prompt = torch.randint(0, 97, (4, 3))
    out = model.generate(prompt, max_new_tokens=1, temperature=1.0, top_k=1)
    assert torch.equal(out[:, -1], model(prompt)[0][:, -1].argmax(-1))


@pytest.mark.parametrize("arch", ["gss", "dss", "hybrid"])
def test_kernels_give_the_same_model(arch):
    fft = build_model(tiny_config(arch, ssm_kernel="fft")).eval()
    chunked = build_model(dataclasses.replace(fft.cfg, ssm_kernel="chunked")).eval()
    chunked.load_state_dict(fft.state_dict())
    ids = torch.randint(0, 97, (2, 50))
    torch.testing.assert_close(chunked(ids)[0], fft(ids)[0], atol=1e-4, rtol=1e-4)


def test_hybrid_cache_is_bounded_by_its_chunk():
    """A prefill keeps at most chunk - 1 keys per local-attention layer; decoding keeps a ring of one chunk."""
    cfg = tiny_config("hybrid")
    model = build_model(cfg).eval()
    _, state = model.prefill(torch.randint(0, 97, (1, 30)), model.init_state(1))
    local = [layer for kind, layer in zip(cfg.layer_kinds(), state.layers) if kind == "local_attention"]
    assert local and all(keys.shape[2] == cfg.attn_chunk - 1 for keys, _ in local)
    decoding = model.start_decoding(state, capacity=10_000)
    for kind, layer in zip(cfg.layer_kinds(), decoding.layers):
        if kind == "local_attention":
            assert layer[0].shape[2] == cfg.attn_chunk


def periodic_rows(generator: torch.Generator, rows: int, length: int, period: int = 3, alphabet: int = 4) -> Tensor:
    """Each row repeats its own random pattern: after the first period, every token is a copy."""
    pattern = torch.randint(0, alphabet, (rows, period), generator=generator)
    return pattern.repeat(1, length // period + 1)[:, :length]


@pytest.mark.parametrize("arch", ["gss", "hybrid"])
def test_zero_shot_at_sixteen_times_the_training_length(arch, record_property):
    """Trained at 32 tokens to copy from 3 back, the model copies as well at 16 x 32 = 512 tokens: the kernel is
    generated for the length asked. The longest memory at init (ssm_max_memory) is below the training length, as
    the README advises.

    Learning is reliable, not lucky: with these sizes (H=32, N=16), Adam at 3e-3 and 400 steps, both archs reach a
    loss of at most 0.007 at the training length for each of GSS_TEST_SEED 0-29 (14x below the 0.1 asked), and the
    loss beyond exceeds it by at most 0.001 (the 0.02 allowed is 20x that). The comparison can fail: a kernel
    generated at the training length and repeated (the bug this test guards against) loses 0.7-6.8 nats more
    beyond, on every seed tried."""
    train_len, period = 32, 3
    data = torch.Generator().manual_seed(TEST_SEED)
    model = build_model(tiny_config(arch, d_ssm=32, state_size=16, ssm_max_memory=8.0))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(400):
        ids = periodic_rows(data, 16, train_len + 1, period)
        _, loss = model(ids[:, :-1], ids[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model.eval()
    ids = periodic_rows(data, 8, 16 * train_len + 1, period)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        logits, _ = model(inputs)
        short, _ = model(inputs[:, :train_len])
        # the same sequence read in pieces of the training length, the state carried between them
        state, pieces = model.init_state(8), []
        for start in range(0, 16 * train_len, train_len):
            piece, state = model.prefill(inputs[:, start : start + train_len], state)
            pieces.append(piece)
    torch.testing.assert_close(torch.cat(pieces, 1), logits, atol=1e-3, rtol=1e-3)
    # target t is token t + 1, a copy once t + 1 >= period
    at_train_len = next_token_loss(short, targets[:, :train_len], reduction="none")[:, period - 1 :].mean()
    beyond = next_token_loss(logits, targets, reduction="none")[:, train_len:].mean()
    record_property("loss_at_train_len", at_train_len.item())
    record_property("loss_beyond", beyond.item())
    assert at_train_len < 0.1, "did not learn to copy: the comparison below would say nothing"
    assert beyond < at_train_len + 0.02, (beyond, at_train_len)


def test_training_reduces_loss(record_property):
    """Four rows memorised: after 60 steps the loss is 0.091-0.098 of the first for GSS_TEST_SEED 0-9 (at 30 steps
    it was 0.45-0.46, too near the bound for any seed on any CPU)."""
    model = build_model(tiny_config("gss"))
    ids = torch.randint(0, 97, (4, 33))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        _, loss = model(ids[:, :-1], ids[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    record_property("loss_ratio", losses[-1] / losses[0])
    assert losses[-1] < 0.25 * losses[0]


def test_config_api():
    assert {"paper-gss", "paper-gss-hybrid", "paper-dss", "paper-transformer"} <= set(PRESETS)
    paper = PRESETS["paper-gss"]
    assert (paper.d_model, paper.d_gate, paper.d_ssm, paper.state_size, paper.n_layers, paper.vocab_size) == (
        1024, 4096, 256, 512, 16, 32_000,
    )  # fmt: skip
    with pytest.raises(ValueError, match="arch must be one of"):
        ModelConfig(arch="rnn")
    with pytest.raises(ValueError, match="ssm_kernel"):
        ModelConfig(ssm_kernel="conv")


def test_paper_presets_have_about_the_same_size():
    counts = {}
    for name in ("paper-gss", "paper-gss-hybrid", "paper-dss", "paper-transformer"):
        with torch.device("meta"):
            counts[name] = build_model(PRESETS[name]).num_parameters()
    assert max(counts.values()) < 1.15 * min(counts.values()), counts


def test_small_presets_are_matched_to_small_gss_and_the_hybrid_attends_in_one_layer_of_four():
    """The miniature table's presets (BENCHMARKS.md section 8) within 5% of small-gss's parameters, and the small
    hybrid at the paper's share of attention: small-gss with its 4th layer local attention, as the paper's 16 layers
    have every 4th."""
    counts = {name: build_model(PRESETS[name]).num_parameters() for name in PRESETS if name.startswith("small-")}
    assert all(abs(count / counts["small-gss"] - 1) < 0.05 for count in counts.values()), counts
    kinds = PRESETS["small-gss-hybrid"].layer_kinds()
    assert kinds == ["gss", "gss", "gss", "local_attention"]
    assert PRESETS["paper-gss-hybrid"].layer_kinds() == kinds * 4


# The chunked loss (models/model.py, chunked_next_token_loss) against next_token_loss on the full logits: a vocab
# of LOSS_VOCAB in chunks of LOSS_CHUNK rows, so that 2 × LENGTH = 42 rows are 8 whole chunks and a partial one.
LOSS_VOCAB, LOSS_CHUNK = 300, 5


@pytest.fixture
def small_loss_chunks(monkeypatch):
    monkeypatch.setattr(model_module, "LOSS_CHUNK_ELEMENTS", LOSS_CHUNK * LOSS_VOCAB)


def loss_and_grads(model: torch.nn.Module, ids: Tensor, targets: Tensor, chunked: bool
                   ) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    model.zero_grad()
    loss = model(ids, targets)[1] if chunked else next_token_loss(model(ids)[0], targets)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def loss_inputs() -> tuple[Tensor, Tensor]:
    ids, targets = torch.randint(0, LOSS_VOCAB, (2, 2, LENGTH))
    targets[1, 4] = -100  # ignored, as next_token_loss (F.cross_entropy) ignores it
    return ids, targets


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_loss_and_its_gradients_are_the_full_logits_ones(arch, dtype, small_loss_chunks):
    model = build_model(tiny_config(arch, vocab_size=LOSS_VOCAB)).to(dtype)
    assert model.head.weight is model.embed.weight  # tied: the loss's weight gradient joins the embedding's
    ids, targets = loss_inputs()
    loss, grads = loss_and_grads(model, ids, targets, chunked=True)
    expected, expected_grads = loss_and_grads(model, ids, targets, chunked=False)
    assert loss.dtype == dtype
    torch.testing.assert_close(loss, expected)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], msg=lambda m: f"{name}: {m}")
    with torch.no_grad():  # the loss alone, without the gradients' work
        torch.testing.assert_close(model(ids, targets)[1], loss, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_loss_under_bf16_autocast_is_the_full_logits_one(arch, small_loss_chunks):
    """The head's matmuls in bf16 (as nn.Linear under autocast), the loss in float32."""
    model = build_model(tiny_config(arch, vocab_size=LOSS_VOCAB))
    ids, targets = loss_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(model, ids, targets, chunked=True)
        expected, expected_grads = loss_and_grads(model, ids, targets, chunked=False)
        with torch.no_grad():
            torch.testing.assert_close(model(ids, targets)[1], loss, rtol=0, atol=0)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    for name, grad in grads.items():  # bf16 products: compared relative to each gradient's size
        scale = expected_grads[name].abs().max().item()
        torch.testing.assert_close(grad, expected_grads[name], rtol=0, atol=0.02 * scale, msg=lambda m: f"{name}: {m}")


def test_compiled_chunked_loss_has_no_graph_break_and_is_the_eager_one(small_loss_chunks):
    """fullgraph=True fails on any graph break. aot_eager: Dynamo and AOTAutograd trace the custom autograd.Function
    as Inductor's would, in seconds (Inductor's code: tests/test_train_step.py and test_fsdp's compiled training)."""
    torch._dynamo.reset()
    model = build_model(tiny_config("transformer", vocab_size=LOSS_VOCAB))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids, targets = loss_inputs()
    loss, grads = loss_and_grads(compiled, ids, targets, chunked=True)
    expected, expected_grads = loss_and_grads(model, ids, targets, chunked=True)
    torch.testing.assert_close(loss, expected)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name.removeprefix("_orig_mod.")], msg=lambda m: f"{name}: {m}")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, targets)[1], expected)
    torch._dynamo.reset()


class LargestOutput(TorchDispatchMode):
    """The most elements any op's output has while the mode is on."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.numel = max([self.numel, *(t.numel() for t in tree_flatten(out)[0] if isinstance(t, Tensor))])
        return out


@pytest.mark.parametrize("arch", ARCHS)
def test_a_training_step_never_holds_the_logits(arch, small_loss_chunks):
    """Forward and backward: no op makes a tensor as large as the [B·L, vocab] logits (the weight and its gradient,
    [vocab, E], are smaller here; a chunk's logits are LOSS_CHUNK rows)."""
    model = build_model(tiny_config(arch, vocab_size=LOSS_VOCAB))
    ids, targets = loss_inputs()
    logits_numel = ids.numel() * LOSS_VOCAB
    assert model.head.weight.numel() < logits_numel
    with LargestOutput() as chunked:
        model(ids, targets)[1].backward()
    assert LOSS_CHUNK * LOSS_VOCAB <= chunked.numel < logits_numel
    with LargestOutput() as full:  # the same check sees the logits where they are made
        next_token_loss(model(ids)[0], targets).backward()
    assert full.numel >= logits_numel
