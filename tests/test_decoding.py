"""The fast decoding path against its references, on CPU, for every architecture: the eager `model.step`, the
parallel forward, and each prompt decoded alone (left padding)."""

import pytest
import torch
from torch._dynamo.utils import counters

from models import ARCHS, build_model
from models.decoding import cast_for_decoding, compiled_model_step, decoding_step, left_padding

from .tiny import tiny_config

PROMPT = 11  # crosses the hybrid's attention chunk (8) and the SSM chunk (8)
NEW_TOKENS = 64


@pytest.fixture(autouse=True)
def fresh_compile_cache():
    """Each test compiles from nothing, so its counts are its own (Dynamo's cache is per process)."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def prefilled(model, ids, capacity):
    _, state = model.prefill(ids, model.init_state(ids.shape[0]))
    return model.start_decoding(state, capacity)


@pytest.mark.parametrize("arch", ARCHS)
def test_fast_decoding_equals_eager_steps_compiles_once_and_keeps_its_buffers(arch):
    """64 greedy tokens after the prompt: the fast step's logits equal eager `model.step`'s to float32 rounding
    (atol 1e-4 on logits of about unit size; the compiled kernels sum in another order), the tokens are identical,
    every state buffer keeps its storage, and the 63 steps ran one compiled graph, compiled once."""
    torch.manual_seed(0)
    model = build_model(tiny_config(arch)).eval()
    ids = torch.randint(0, 97, (3, PROMPT))
    capacity = PROMPT + NEW_TOKENS
    with torch.no_grad():
        first = model(ids)[0][:, -1].argmax(-1)
        eager_state, fast_state = prefilled(model, ids, capacity), prefilled(model, ids, capacity)
        eager = decoding_step(model, eager_state, temperature=0, top_k=None, fast=False)
        fast = decoding_step(model, fast_state, temperature=0, top_k=None, fast=True)
        pointers = [t.data_ptr() for t in fast_state.tensors()]
        eager_token = fast_token = first
        for _ in range(NEW_TOKENS - 1):
            eager_logits, eager_token = eager(eager_token)
            fast_logits, fast_token = fast(fast_token)
            torch.testing.assert_close(fast_logits, eager_logits, atol=1e-4, rtol=1e-4)
            assert torch.equal(fast_token, eager_token)
    assert [t.data_ptr() for t in fast_state.tensors()] == pointers
    assert int(fast_state.position) == int(eager_state.position) == capacity - 1
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert counters["aot_autograd"]["total"] == 1 and not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.parametrize("arch", ARCHS)
def test_teacher_forced_fast_steps_equal_the_parallel_forward(arch):
    """Mamba's test_generation: feed the sequence's own tokens to the compiled step; its logits are the parallel
    pass's at every position (float64, so any difference is a bug, not rounding)."""
    torch.manual_seed(1)
    model = build_model(tiny_config(arch)).double().eval()
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        parallel, _ = model(ids)
        state = prefilled(model, ids[:, :PROMPT], capacity=40)
        stepped = [compiled_model_step(model, ids[:, t], state) for t in range(PROMPT, 40)]
    torch.testing.assert_close(torch.stack(stepped, 1), parallel[:, PROMPT:])


def test_a_transformer_decode_grows_its_key_value_slots():
    """`with_capacity` (what the Hugging Face export's cache does when `generate` runs past the slots it has): the
    tokens decoded before and after the growth are the parallel pass's."""
    torch.manual_seed(5)
    model = build_model(tiny_config("transformer")).double().eval()
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        parallel, _ = model(ids)
        state = prefilled(model, ids[:, :5], capacity=8)
        stepped = [model.step(ids[:, t], state) for t in range(5, 8)]  # every slot full
        state = model.with_capacity(state, 20)
        stepped += [model.step(ids[:, t], state) for t in range(8, 20)]
    torch.testing.assert_close(torch.stack(stepped, 1), parallel[:, 5:])
    assert state.layers[0][0].shape[2] == 20


def test_past_the_recompile_limit_decoding_goes_on_eagerly():
    """A process that meets more model shapes than Dynamo compiles (its recompile limit, 1 here, 8 by default: a
    test suite, a notebook) gets the eager step's tokens, not an error."""
    prompt = torch.randint(0, 97, (2, PROMPT))
    with torch._dynamo.config.patch(recompile_limit=1):
        for arch in ("gss", "transformer"):
            model = build_model(tiny_config(arch)).eval()
            assert torch.equal(model.generate(prompt, 5, temperature=0), model.generate(prompt, 5, temperature=0,
                                                                                         fast=False))  # fmt: skip


def test_sampling_draws_the_same_tokens_fast_or_eager():
    """The draw is outside the compiled graph and never waits on the device; a seed gives one text either way."""
    model = build_model(tiny_config("hybrid")).eval()
    prompt = torch.randint(0, 97, (4, PROMPT))
    texts = []
    for fast in (False, True):
        torch.manual_seed(7)
        texts.append(model.generate(prompt, 30, temperature=0.9, top_k=20, fast=fast))
    assert torch.equal(*texts)
    torch.manual_seed(7)
    assert not torch.equal(model.generate(prompt, 30, temperature=0.9, top_k=None), texts[0])  # it does sample


@pytest.mark.parametrize("arch", ARCHS)
def test_a_left_padded_batch_gives_each_prompt_its_own_tokens(arch):
    """Prompts of 3, 11 and 17 tokens in one batch, left-padded with junk: each row's greedy tokens are those it
    gets alone, fast and eager. float64, so a padded position leaking into a row would show."""
    torch.manual_seed(2)
    model = build_model(tiny_config(arch)).double().eval()
    prompts = [torch.randint(0, 97, (n,)) for n in (3, 11, 17)]
    longest = max(len(p) for p in prompts)
    ids = torch.randint(0, 97, (len(prompts), longest))  # junk in the padding: it must not matter
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :], mask[row, longest - len(prompt) :] = prompt, 1
    alone = [model.generate(p[None], 20, temperature=0, fast=False)[0, len(p) :] for p in prompts]
    for fast in (False, True):
        batched = model.generate(ids, 20, temperature=0, attention_mask=mask, fast=fast)[:, longest:]
        for row, expected in enumerate(alone):
            assert torch.equal(batched[row], expected), (fast, row)


def test_attention_masks_that_are_not_left_padding_are_refused():
    ids = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="left padding"):
        left_padding(torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]), ids)
    with pytest.raises(ValueError, match="at least one token"):
        left_padding(torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]), ids)
    with pytest.raises(ValueError, match="one 0 or 1 per token"):
        left_padding(torch.ones(2, 3), ids)
    assert left_padding(torch.ones(2, 4), ids) is None
    assert left_padding(torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]), ids).tolist() == [1, 0]


def test_decoding_in_bfloat16_weights_keeps_the_ssm_in_float32():
    """`cast_for_decoding`: the weights a GPU decode reads in bf16, the SSM's parameters and state in float32; the
    logits stay within bf16 rounding of the float32 model's (atol 0.05 on logits of about unit size)."""
    torch.manual_seed(3)
    model = build_model(tiny_config("hybrid")).eval()
    ids = torch.randint(0, 97, (2, PROMPT))
    with torch.no_grad():
        reference = model.step(ids[:, -1], prefilled(model, ids[:, :-1], PROMPT))
        cast_for_decoding(model, torch.bfloat16)
        state = prefilled(model, ids[:, :-1], PROMPT)
        logits = model.step(ids[:, -1], state)
    assert model.head.weight.dtype == torch.bfloat16 and model.blocks[0].ssm.C_re.dtype == torch.float32
    assert state.layers[0].dtype == torch.float32
    torch.testing.assert_close(logits.float(), reference, atol=0.05, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-graph capture needs a CUDA device")
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_graph_decoding_equals_eager(arch):
    """The graph is a thin layer over the CPU-tested compiled step: same greedy tokens in float32."""
    torch.manual_seed(4)
    model = build_model(tiny_config(arch)).cuda().eval()
    ids = torch.randint(0, 97, (3, PROMPT), device="cuda")
    assert torch.equal(model.generate(ids, NEW_TOKENS, temperature=0, fast=True),
                       model.generate(ids, NEW_TOKENS, temperature=0, fast=False))  # fmt: skip
