"""The three ways of applying the DSS kernel, and the recurrence, agree with the O(L^2) reference."""

import pytest
import torch

from models.ssm import DiagonalSSM, conv_direct, conv_fft, scan_chunked


def make_ssm(channels=6, state_size=12, chunk=8) -> DiagonalSSM:
    ssm = DiagonalSSM(channels, state_size, kernel="chunked", chunk_size=chunk)
    with torch.no_grad():  # keep slow modes that reach across many chunks in the test
        ssm.log_neg_real.uniform_(-6.0, 0.5)
    return ssm


@pytest.mark.parametrize("length", [1, 7, 8, 9, 24, 45])
def test_kernels_match_reference_float32(length):
    ssm = make_ssm()
    u = torch.randn(3, length, 6)
    kernel = ssm.kernel(length)
    w_re, w_im, a, b = ssm.modes()
    reference = conv_direct(u, kernel, ssm.skip)
    fft = conv_fft(u, kernel, ssm.skip)
    chunked, _ = scan_chunked(u, w_re, w_im, a, b, ssm.skip, ssm.chunk_size)
    scale = reference.abs().max()
    torch.testing.assert_close(fft / scale, reference / scale, atol=2e-6, rtol=0)
    torch.testing.assert_close(chunked / scale, reference / scale, atol=2e-6, rtol=0)


def test_kernel_is_the_dss_formula():
    """K[h, l] = Re(sum_n C[h, n] (exp(Lambda_n) - 1) / Lambda_n exp(Lambda_n l)), in complex128."""
    ssm = make_ssm().double()
    lam = -torch.exp(ssm.log_neg_real) + 1j * torch.exp(ssm.log_imag)
    c = ssm.c_re + 1j * ssm.c_im
    l = torch.arange(30, dtype=torch.float64)
    expected = ((c * (torch.exp(lam) - 1) / lam) @ torch.exp(lam[:, None] * l[None, :])).real
    torch.testing.assert_close(ssm.kernel(30), expected)


def test_step_and_state_carry_match_parallel():
    ssm = make_ssm().double()
    u = torch.randn(2, 29, 6, dtype=torch.float64)
    parallel, _ = ssm(u)
    # recurrence, one token at a time
    state, outputs = ssm.init_state(2), []
    for t in range(29):
        y, state = ssm.step(u[:, t], state)
        outputs.append(y)
    torch.testing.assert_close(torch.stack(outputs, 1), parallel)
    # pieces of uneven length carrying the state reproduce both the output and the final state
    piece_state, pieces = ssm.init_state(2), []
    for start, end in [(0, 5), (5, 21), (21, 29)]:
        y, piece_state = ssm(u[:, start:end], piece_state)
        pieces.append(y)
    torch.testing.assert_close(torch.cat(pieces, 1), parallel)
    torch.testing.assert_close(piece_state, state)


def test_fft_runs_in_float32_under_bf16_autocast():
    ssm = DiagonalSSM(4, 8, kernel="fft")
    u = torch.randn(1, 16, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = ssm(u.bfloat16())
    exact, _ = ssm(u.bfloat16().float())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), exact, atol=0.05, rtol=0.02)  # only the final rounding


def test_gradients_match_between_kernels():
    u = torch.randn(2, 20, 6)
    grads = {}
    for method in ("fft", "chunked"):
        torch.manual_seed(1)
        ssm = make_ssm()
        ssm.kernel_method = method
        y, _ = ssm(u)
        (y**2).sum().backward()
        grads[method] = torch.cat([p.grad.flatten() for p in ssm.parameters()])
    torch.testing.assert_close(grads["chunked"], grads["fft"], atol=1e-3, rtol=1e-4)


def test_float32_stays_accurate_at_long_lengths():
    """Zero-shot lengths: at 16k with modes remembering ~8k tokens, both kernels in float32 stay
    within 1e-4 of a float64 evaluation."""
    ssm = DiagonalSSM(4, 64, chunk_size=128)
    with torch.no_grad():
        ssm.log_neg_real.uniform_(-9.0, 0.0)
    exact = DiagonalSSM(4, 64).double()
    exact.load_state_dict(ssm.state_dict())
    u = torch.randn(1, 16384, 4)
    reference = conv_fft(u.double(), exact.kernel(16384), exact.skip)
    w_re, w_im, a, b = ssm.modes()
    fft = conv_fft(u, ssm.kernel(16384), ssm.skip)
    chunked, _ = scan_chunked(u, w_re, w_im, a, b, ssm.skip, ssm.chunk_size)
    scale = reference.abs().max()
    for y in (fft, chunked):
        assert ((y.double() - reference).abs().max() / scale) < 1e-4


def test_initial_memory_is_bounded_by_max_memory():
    """No mode outlives ssm_max_memory at init: the kernel beyond a few times it is negligible."""
    for max_memory in (16.0, 1000.0):
        kernel = DiagonalSSM(8, 64, max_memory=max_memory).kernel(8192).abs()
        late = kernel[:, int(8 * max_memory):].max()
        assert late < 1e-2 * kernel[:, :4].max(), max_memory
    assert DiagonalSSM(8, 64, max_memory=16.0).kernel(512)[:, 128:].abs().max() < DiagonalSSM(
        8, 64, max_memory=1000.0).kernel(512)[:, 128:].abs().max()
