"""Model-level contracts for every architecture: shapes, causality, recurrent decoding, kernels."""

import dataclasses

import pytest
import torch

from models import ARCHS, PRESETS, ModelConfig, build_model

from .tiny import tiny_config

LENGTH = 21  # crosses SSM chunks (8) and hybrid attention chunks (8) and ends mid-chunk


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shape_and_causality(arch):
    model = build_model(tiny_config(arch)).eval()
    ids = torch.randint(0, 97, (2, LENGTH))
    logits = model(ids)
    assert logits.shape == (2, LENGTH, 97)
    for t in (0, 7, 8, 15):
        changed = ids.clone()
        changed[:, t + 1 :] = torch.randint(0, 97, changed[:, t + 1 :].shape)
        torch.testing.assert_close(model(changed)[:, : t + 1], logits[:, : t + 1], atol=1e-5, rtol=0)
        assert not torch.allclose(model(changed)[:, t + 1 :], logits[:, t + 1 :])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel", ["fft", "chunked"])
def test_step_matches_parallel_forward(arch, kernel):
    model = build_model(tiny_config(arch, ssm_kernel=kernel)).double().eval()
    ids = torch.randint(0, 97, (3, LENGTH))
    parallel = model(ids)
    state, stepped = model.init_state(3), []
    for t in range(LENGTH):
        logits, state = model.step(ids[:, t], state)
        stepped.append(logits)
    torch.testing.assert_close(torch.stack(stepped, 1), parallel)
    # a prompt read in parallel pieces hands the same state to recurrent decoding
    state = model.init_state(3)
    first, state = model.prefill(ids[:, :5], state)
    second, state = model.prefill(ids[:, 5:19], state)
    torch.testing.assert_close(torch.cat([first, second], 1), parallel[:, :19])
    for t in (19, 20):
        logits, state = model.step(ids[:, t], state)
        torch.testing.assert_close(logits, parallel[:, t])


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generate_equals_repeated_full_forwards(arch):
    model = build_model(tiny_config(arch)).double().eval()
    prompt = torch.randint(0, 97, (2, 11))
    out = model.generate(prompt, max_new_tokens=9, temperature=0.0)
    assert out.shape == (2, 20)
    expected = prompt
    for _ in range(9):
        expected = torch.cat([expected, model(expected)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, expected)


def test_sampling_respects_top_k():
    model = build_model(tiny_config("gss")).eval()
    prompt = torch.randint(0, 97, (4, 3))
    out = model.generate(prompt, max_new_tokens=1, temperature=1.0, top_k=1)
    assert torch.equal(out[:, -1], model(prompt)[:, -1].argmax(-1))


@pytest.mark.parametrize("arch", ["gss", "dss", "hybrid"])
def test_kernels_give_the_same_model(arch):
    torch.manual_seed(3)
    fft = build_model(tiny_config(arch, ssm_kernel="fft")).eval()
    chunked = build_model(dataclasses.replace(fft.cfg, ssm_kernel="chunked")).eval()
    chunked.load_state_dict(fft.state_dict())
    ids = torch.randint(0, 97, (2, 50))
    torch.testing.assert_close(chunked(ids), fft(ids), atol=1e-4, rtol=1e-4)


def test_hybrid_cache_is_bounded_by_its_chunk():
    cfg = tiny_config("hybrid")
    model = build_model(cfg).eval()
    state = model.init_state(1)
    _, state = model.prefill(torch.randint(0, 97, (1, 30)), state)
    for _ in range(20):
        _, state = model.step(torch.randint(0, 97, (1,)), state)
        for kind, layer in zip(cfg.layer_kinds(), state.layers):
            if kind == "local_attention":
                assert layer[0].shape[2] == state.position % cfg.attn_chunk < cfg.attn_chunk


@pytest.mark.parametrize("arch", ["gss", "hybrid"])
def test_zero_shot_at_sixteen_times_the_training_length(arch):
    """The kernel is generated for the length asked, so a long context needs nothing stored."""
    model = build_model(tiny_config(arch)).eval()
    with torch.no_grad():
        logits = model(torch.randint(0, 97, (1, 16 * 64)))
    assert torch.isfinite(logits).all()


def test_training_reduces_loss():
    model = build_model(tiny_config("gss"))
    ids = torch.randint(0, 97, (4, 33))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_config_api():
    assert {"paper-gss", "paper-gss-hybrid", "paper-dss", "paper-transformer"} <= set(PRESETS)
    paper = PRESETS["paper-gss"]
    assert (paper.d_model, paper.d_gate, paper.d_ssm, paper.state_size, paper.n_layers, paper.vocab_size) == (
        1024, 4096, 256, 512, 16, 32_000,
    )  # fmt: skip
    assert dataclasses.replace(paper, ssm_kernel="chunked").ssm_kernel == "chunked"
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
