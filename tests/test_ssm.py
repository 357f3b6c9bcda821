"""Every way of applying the DSS layer agrees with the two references: the O(L^2) convolution
(conv_direct) and the token-by-token recurrence (scan_ref)."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from models import build_model
from models.ssm import (
    DiagonalSSM,
    complex_powers,
    conv_direct,
    conv_fft,
    fft_size,
    per_channel_kernel,
    per_channel_kernel_ref,
    scan_chunked,
    scan_ref,
    scan_step,
    scan_step_,
)

from .seed import TEST_SEED
from .tiny import tiny_config


def make_ssm(channels=6, state_size=12, chunk=8, learned_step=False) -> DiagonalSSM:
    ssm = DiagonalSSM(channels, state_size, kernel="chunked", chunk_size=chunk, learned_step=learned_step)
    with torch.no_grad():  # keep slow modes that reach across many chunks in the test
        ssm.Lambda_re.uniform_(-6.0, 0.5)
        if learned_step:  # steps that differ between channels by up to 20x, around 1
            ssm.log_dt.uniform_(-2.0, 1.0)
    return ssm


# Every kernel runs with the modes shared (GSS: Delta = 1, Lambda [N]) and with a step per channel (DSS: [H, N]).
step_kinds = pytest.mark.parametrize("learned_step", [False, True], ids=["delta1", "learned_step"])


@step_kinds
@pytest.mark.parametrize("length", [1, 7, 8, 9, 24, 45])
def test_kernels_match_reference_float32(length, learned_step):
    ssm = make_ssm(learned_step=learned_step)
    u = torch.randn(3, 6, length)  # [B, H, L]; the scans take [B, L, H]
    W, Lambda = ssm.modes()
    reference = conv_direct(u, ssm.kernel(length), ssm.D)
    fft = conv_fft(u, ssm.kernel(length), ssm.D)
    chunked, _ = scan_chunked(u.mT, W, Lambda, ssm.D, chunk_size=ssm.chunk_size)
    recurrent, _ = scan_ref(u.mT, W, Lambda, ssm.D)
    scale = reference.abs().max()
    for y in (fft, chunked.mT, recurrent.mT):
        torch.testing.assert_close(y / scale, reference / scale, atol=2e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("length", [1, 3, 8, 13, 64])
def test_fft_convolution_and_its_gradients_are_the_direct_ones(length, dtype):
    """`conv_fft`'s written-out backward (correlations with the kept spectra) against autograd through
    `conv_direct`, for every input: u, the kernel K and the skip D folded into K's first tap."""
    inputs = [torch.randn(3, 5, length, dtype=dtype), torch.randn(5, length, dtype=dtype), torch.randn(5, dtype=dtype)]
    weights = torch.randn(3, 5, length, dtype=dtype)  # a loss that weighs every output differently
    results = []
    for conv in (conv_fft, conv_direct):
        leaves = [t.clone().requires_grad_() for t in inputs]
        y = conv(*leaves)
        (y * weights).sum().backward()
        results.append([y, *(t.grad for t in leaves)])
    tolerance = {} if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-4)
    for fft, direct in zip(*results):
        torch.testing.assert_close(fft, direct, **tolerance)


def test_fft_size_is_a_power_of_two_of_at_least_twice_the_length():
    assert [fft_size(n) for n in (1, 2, 3, 4096, 4097, 65536)] == [2, 4, 8, 8192, 16384, 131072]


# On and off multiples of the chunk (8); 1 to 32 chunks, odd and even counts at every level of the carry.
@step_kinds
@pytest.mark.parametrize("length", [1, 5, 8, 16, 21, 40, 59, 104, 256, 261])
def test_chunked_scan_matches_the_recurrence_from_any_state(length, learned_step):
    ssm = make_ssm(learned_step=learned_step).double()
    W, Lambda = ssm.modes()
    u = torch.randn(2, length, 6, dtype=torch.float64)
    start = torch.randn(2, 2, 6, 12, dtype=torch.float64)  # [re/im, B, H, N]
    expected, expected_state = scan_ref(u, W, Lambda, ssm.D, start)
    y, state = scan_chunked(u, W, Lambda, ssm.D, start, chunk_size=8)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(state, expected_state)


@step_kinds
@pytest.mark.parametrize("length", [21, 40, 59])  # 2, 5 and 7 chunks (odd counts pad a level of the carry)
def test_chunked_scan_gradients_match_the_recurrence(length, learned_step):
    """Gradients of every input, the starting state and the parameters included, of the outputs and of
    the final state."""
    grads = {}
    for name, scan in (("chunked", lambda *args: scan_chunked(*args, chunk_size=8)), ("ref", scan_ref)):
        torch.manual_seed(TEST_SEED)
        ssm = make_ssm(learned_step=learned_step).double()
        u = torch.randn(2, length, 6, dtype=torch.float64, requires_grad=True)
        start = torch.randn(2, 2, 6, 12, dtype=torch.float64, requires_grad=True)
        W, Lambda = ssm.modes()
        y, state = scan(u, W, Lambda, ssm.D, start)
        (y.sin().sum() + state.cos().sum()).backward()
        grads[name] = [u.grad, start.grad, *(p.grad for p in ssm.parameters())]
    for chunked, ref in zip(grads["chunked"], grads["ref"]):
        torch.testing.assert_close(chunked, ref)


def test_chunked_scan_graph_grows_with_log_of_the_chunk_count():
    """The carry between chunks is log-depth: under XLA the traced graph is what runs, so the ops of
    one forward + backward may grow by a constant per doubling of the chunks, not per chunk."""

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += 1
            return func(*args, **(kwargs or {}))

    ssm = make_ssm(chunk=4)
    counts = []
    for n_chunks in (4, 8, 16, 32, 64, 128):
        u = torch.randn(1, 6, 4 * n_chunks, requires_grad=True)
        with CountOps() as ops:
            y, state = ssm(u, ssm.init_state(1))
            (y.sum() + state.sum()).backward()
        counts.append(ops.count)
    steps = [later - earlier for earlier, later in zip(counts, counts[1:])]
    assert len(set(steps)) == 1 and steps[0] < counts[0], counts


@step_kinds
@pytest.mark.parametrize("length", [1, 30, 257])
def test_kernel_is_the_dss_formula(length, learned_step):
    """K[h, l] = Re(sum_n C[h, n] (exp(Delta_h Lambda_n) - 1) / Lambda_n exp(Delta_h Lambda_n l)), in complex128
    (Delta = 1 without a learned step); 257 is one past a whole number of blocks of the per-channel kernel."""
    ssm = make_ssm(learned_step=learned_step).double()
    Lambda = -torch.exp(ssm.Lambda_re) + 1j * torch.exp(ssm.Lambda_im)
    delta = torch.exp(ssm.log_dt)[:, None, None] if learned_step else torch.ones(1, 1, 1, dtype=torch.float64)
    C = ssm.C_re + 1j * ssm.C_im
    t = torch.arange(length, dtype=torch.float64)
    powers = torch.exp(delta * Lambda[None, :, None] * t)  # [H or 1, N, L]
    expected = (((C * (torch.exp(delta[..., 0] * Lambda) - 1) / Lambda)[..., None]) * powers).sum(1).real
    torch.testing.assert_close(ssm.kernel(length), expected)


@pytest.mark.parametrize("length", [1, 2, 15, 16, 17, 100, 1000])
def test_per_channel_kernel_and_its_gradients_are_the_whole_powers_ones(length):
    """`per_channel_kernel` (blocked powers, a written-out backward) against autograd through the [H, N, L] powers,
    in float64: the kernel and the gradients of W and Delta Lambda, for lengths on and off whole blocks."""
    torch.manual_seed(TEST_SEED)
    ssm = make_ssm(learned_step=True).double()
    weights = torch.randn(6, length, dtype=torch.float64)
    results = []
    for kernel in (per_channel_kernel, per_channel_kernel_ref):
        W, Lambda = (tuple(part.detach().requires_grad_() for part in pair) for pair in ssm.modes())
        K = kernel(W, Lambda, length)
        (K * weights).sum().backward()
        results.append([K, *(part.grad for part in (*W, *Lambda))])
    for blocked, whole in zip(*results):
        torch.testing.assert_close(blocked, whole)


def test_per_channel_kernel_in_groups_of_channels_is_the_kernel_in_one():
    """Channels in groups of 4, 4 and 1 (blocks capped at 4 channels' worth) give the kernel and gradients of one."""
    ssm = make_ssm(channels=9, learned_step=True).double()
    weights = torch.randn(9, 100, dtype=torch.float64)
    results = []
    for cap in (1 << 24, 4 * 12 * (7 + 16)):  # 100 tokens: blocks of T = 16, A = 7; N = 12 modes
        ssm.zero_grad()
        K = per_channel_kernel(*ssm.modes(), 100, max_block_elements=cap)
        (K * weights).sum().backward()
        results.append([K, *(p.grad for p in ssm.parameters() if p.grad is not None)])
    for grouped, whole in zip(*results):
        torch.testing.assert_close(grouped, whole)


def test_dss_weights_saved_without_a_step_load_with_a_step_of_one():
    """A DSS layer saved before it learned a step computes, loaded now, what it computed then (Delta = 1)."""
    old = make_ssm()
    new = make_ssm(learned_step=True)
    new.load_state_dict(old.state_dict())
    assert new.log_dt.eq(0).all()
    u = torch.randn(2, 6, 40)
    for method in ("fft", "chunked"):
        old.kernel_method = new.kernel_method = method
        torch.testing.assert_close(new(u)[0], old(u)[0])


@step_kinds
def test_step_and_state_carry_match_parallel(learned_step):
    ssm = make_ssm(learned_step=learned_step).double()
    u = torch.randn(2, 6, 29, dtype=torch.float64)
    parallel, _ = ssm(u)
    # recurrence, one token at a time
    state, outputs = ssm.init_state(2), []
    for t in range(29):
        outputs.append(ssm.step(u[..., t], state))  # the state moves on in place
    torch.testing.assert_close(torch.stack(outputs, -1), parallel)
    # pieces of uneven length carrying the state reproduce both the output and the final state
    piece_state, pieces = ssm.init_state(2), []
    for start, end in [(0, 5), (5, 21), (21, 29)]:
        y, piece_state = ssm(u[..., start:end], piece_state)
        pieces.append(y)
    torch.testing.assert_close(torch.cat(pieces, -1), parallel)
    torch.testing.assert_close(piece_state, state)


@step_kinds
def test_the_in_place_step_is_the_reference_step(learned_step):
    """`scan_step_` (y read off the state before the update, the state overwritten) against `scan_step`."""
    ssm = make_ssm(learned_step=learned_step).double()
    W, Lambda = ssm.modes()
    lam = complex_powers(Lambda, torch.ones(1, dtype=torch.float64))
    D = ssm.D.detach()
    state = torch.randn(2, 3, 6, 12, dtype=torch.float64)
    u = torch.randn(3, 6, dtype=torch.float64)
    expected_y, expected_state = scan_step(u, W, lam, D, state)
    buffer = state.clone()
    y = scan_step_(u, ssm.step_constants(), buffer)
    torch.testing.assert_close(y, expected_y)
    torch.testing.assert_close(buffer, expected_state)


def test_fft_runs_in_float32_under_bf16_autocast():
    ssm = DiagonalSSM(4, 8, kernel="fft")
    u = torch.randn(1, 4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = ssm(u.bfloat16())
    exact, _ = ssm(u.bfloat16().float())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), exact, atol=0.05, rtol=0.02)  # only the final rounding


@step_kinds
def test_gradients_match_between_kernels(learned_step):
    u = torch.randn(2, 6, 20)
    grads = {}
    for method in ("fft", "chunked"):
        torch.manual_seed(TEST_SEED)
        ssm = make_ssm(learned_step=learned_step)
        ssm.kernel_method = method
        y, _ = ssm(u)
        (y**2).sum().backward()
        grads[method] = torch.cat([p.grad.flatten() for p in ssm.parameters()])
    torch.testing.assert_close(grads["chunked"], grads["fft"], atol=1e-3, rtol=1e-4)


@step_kinds
def test_float32_stays_accurate_at_long_lengths(record_property, learned_step):
    """Zero-shot lengths: at 16k with modes remembering ~8k tokens, both kernels in float32 stay within 5e-4 of a
    float64 evaluation (relative to its largest output).

    The error is float32's own: the phase Lambda_im * l of a mode is rounded to 24 bits, about 1e-3 rad at l = 16k.
    Measured for GSS_TEST_SEED 0-39: at most 1.7e-4 for fft and 1.1e-4 for chunked (typically 2e-5 to 7e-5), so
    5e-4 is 3x the worst; the kernel rounded to bfloat16 is off by 2e-3 (seed 0). (The 1e-4 asked before passed for
    seed 0 and failed for seed 3.) With the DSS paper's modes and steps (memories up to 8k tokens) the phases stay small
    where the memory is long (a fast mode's step also makes it decay fast): at most 9e-7 for both kernels, seeds 0-9.
    A step per channel on modes fast and slow at once (Lambda_im up to 200 rad per token remembered for 8k tokens) is
    off by up to 2.4e-3: the phase's rounding, 1e-5 rad per token there, is the parameter's own in float32."""
    ssm = DiagonalSSM(4, 64, chunk_size=128, learned_step=learned_step)
    with torch.no_grad():
        if learned_step:  # the DSS paper's modes, with steps down to memories of 8k tokens
            ssm.log_dt.uniform_(math.log(2.5e-4), math.log(1e-1))
        else:
            ssm.Lambda_re.uniform_(-9.0, 0.0)
    exact = DiagonalSSM(4, 64, learned_step=learned_step).double()
    exact.load_state_dict(ssm.state_dict())
    u = torch.randn(1, 4, 16384)
    reference = conv_fft(u.double(), exact.kernel(16384), exact.D)
    W, Lambda = ssm.modes()
    fft = conv_fft(u, ssm.kernel(16384), ssm.D)
    chunked = scan_chunked(u.mT, W, Lambda, ssm.D, chunk_size=ssm.chunk_size)[0].mT
    scale = reference.abs().max()
    for name, y in (("fft", fft), ("chunked", chunked)):
        error = ((y.double() - reference).abs().max() / scale).item()
        record_property(f"{name}_relative_error", error)
        assert error < 5e-4, name


def test_initial_memory_is_bounded_by_max_memory():
    """No mode outlives ssm_max_memory at init: the kernel beyond a few times it is negligible. DSS's steps start in
    [1/max_memory, 100/max_memory]: the DSS paper's [1e-3, 1e-1] at the default 1000."""
    for max_memory in (64.0, 1000.0):
        steps = DiagonalSSM(512, 8, max_memory=max_memory, learned_step=True).log_dt.exp()
        assert 1 / max_memory <= steps.min() and steps.max() <= 100 / max_memory
        assert steps.max() / steps.min() > 50  # spread over the range, not bunched
    for max_memory in (16.0, 1000.0):
        kernel = DiagonalSSM(8, 64, max_memory=max_memory).kernel(8192).abs()
        late = kernel[:, int(8 * max_memory):].max()
        assert late < 1e-2 * kernel[:, :4].max(), max_memory
    assert DiagonalSSM(8, 64, max_memory=16.0).kernel(512)[:, 128:].abs().max() < DiagonalSSM(
        8, 64, max_memory=1000.0).kernel(512)[:, 128:].abs().max()


def test_ssm_parameters_and_only_they_are_exempt_from_weight_decay():
    model = build_model(tiny_config("dss"))
    ssm_params = {id(p) for m in model.modules() if isinstance(m, DiagonalSSM) for p in m.parameters()}
    assert len(ssm_params) == 6 * model.cfg.n_layers  # Lambda_re, Lambda_im, C_re, C_im, D, log_dt
    for name, p in model.named_parameters():
        assert getattr(p, "_no_weight_decay", False) == (id(p) in ssm_params), name
    # .to() onto another tensor type (an XLA device) replaces every Parameter: the flag must survive it
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model.double()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    assert all(p._no_weight_decay for m in model.modules() if isinstance(m, DiagonalSSM) for p in m.parameters())
