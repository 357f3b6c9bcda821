"""The diagonal state space (DSS) layer of the GSS paper, in real arithmetic.

One layer maps H input channels to H output channels. Channel h sees the kernel

    K[h, l] = Re( sum_n W[h, n] * lam_n ** l ),   W = C * (exp(Lambda) - 1) / Lambda,   lam = exp(Lambda)

with Lambda_n = -exp(Lambda_re[n]) + i * exp(Lambda_im[n]) shared by all channels and the step size
Delta fixed to 1, so y = causal_conv(u, K) + D * u. The same map is the linear recurrence

    x_t = lam * x_{t-1} + u_t,   y_t = Re(sum_n W[h, n] x_t[n]) + D * u_t,

which is what `step()` runs and what lets a parallel pass hand its final state to recurrent decoding.

Every complex number is kept as a (real, imaginary) pair of real tensors: torch_xla does not lower
complex ops or FFTs, so the `chunked` kernel below runs on TPU without a single host fallback.

Three ways to apply the kernel, all with the same result:
  * `conv_direct`  O(L^2) materialised Toeplitz matrix: the obviously correct reference (tests only).
  * `conv_fft`     O(L log L) real FFT, always in float32: the paper's method, fast on CPU and GPU.
  * `scan_chunked` no FFT: matmuls inside chunks of T tokens and a state carried between chunks,
                   O(L (T + N)) work. The TPU path; it also returns the final recurrent state.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# A recurrent state is the complex vector x per (batch, channel), stored as a real tensor
# of shape [2, B, H, N]: index 0 holds the real parts, index 1 the imaginary parts.
SSMState = Tensor


def complex_powers(log_decay: Tensor, freq: Tensor, exponents: Tensor) -> tuple[Tensor, Tensor]:
    """lam ** e for lam = exp(log_decay + i freq): returns (real, imag), each [len(exponents), N]."""
    e = exponents.to(log_decay.dtype)[:, None]
    magnitude = torch.exp(log_decay * e)
    return magnitude * torch.cos(freq * e), magnitude * torch.sin(freq * e)


def dss_kernel(w_re: Tensor, w_im: Tensor, log_decay: Tensor, freq: Tensor, length: int) -> Tensor:
    """The convolution kernel K[h, l] = Re(sum_n W[h, n] lam_n ** l) for l < length: [H, length]."""
    p_re, p_im = complex_powers(log_decay, freq, torch.arange(length, device=w_re.device))
    return w_re @ p_re.T - w_im @ p_im.T


def conv_direct(u: Tensor, kernel: Tensor, skip: Tensor) -> Tensor:
    """Reference: y[b, t, h] = sum_{s <= t} K[h, t - s] u[b, s, h] + D[h] u[b, t, h]."""
    length = u.shape[1]
    lag = torch.arange(length)[:, None] - torch.arange(length)[None, :]  # [t, s]
    toeplitz = kernel[:, lag.clamp(min=0)] * (lag >= 0)  # [H, t, s]
    return torch.einsum("hts,bsh->bth", toeplitz, u) + skip * u


def conv_fft(u: Tensor, kernel: Tensor, skip: Tensor) -> Tensor:
    """Causal convolution by real FFT with zero padding to 2L; float32 even under autocast."""
    length = u.shape[1]
    dtype = torch.promote_types(u.dtype, torch.float32)
    u32, k32 = u.to(dtype), kernel.to(dtype)
    spectrum = torch.fft.rfft(u32, n=2 * length, dim=1) * torch.fft.rfft(k32.T, n=2 * length, dim=0)
    y = torch.fft.irfft(spectrum, n=2 * length, dim=1)[:, :length]
    return (y + skip * u32).to(u.dtype)


def scan_chunked(
    u: Tensor,
    w_re: Tensor,
    w_im: Tensor,
    log_decay: Tensor,
    freq: Tensor,
    skip: Tensor,
    chunk_size: int,
    state: SSMState | None = None,
) -> tuple[Tensor, SSMState]:
    """Apply the SSM to u [B, L, H] from `state` without FFT; returns (y [B, L, H], final state).

    Full chunks run together; a shorter last chunk runs as one chunk of its own length, so the
    final state is exact for any L (padding at the end would decay the state by the pad length).
    """
    batch, length, channels = u.shape
    if state is None:
        state = u.new_zeros(2, batch, channels, w_re.shape[1])
    full = (length // chunk_size) * chunk_size
    pieces = []
    if full:
        y, state = _scan_full_chunks(u[:, :full], w_re, w_im, log_decay, freq, chunk_size, state)
        pieces.append(y)
    if full < length:
        y, state = _scan_full_chunks(u[:, full:], w_re, w_im, log_decay, freq, length - full, state)
        pieces.append(y)
    y = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
    return y + skip * u, state


def _scan_full_chunks(
    u: Tensor, w_re: Tensor, w_im: Tensor, log_decay: Tensor, freq: Tensor, chunk: int, state: SSMState
) -> tuple[Tensor, SSMState]:
    """scan_chunked without the skip term, for L a multiple of `chunk`."""
    batch, length, channels = u.shape
    n_chunks = length // chunk
    u = u.reshape(batch, n_chunks, chunk, channels)

    # 1. Inside each chunk: a [T, T] lower-triangular Toeplitz matmul per channel.
    kernel = dss_kernel(w_re, w_im, log_decay, freq, chunk)  # [H, T]
    lag = torch.arange(chunk, device=u.device)[:, None] - torch.arange(chunk, device=u.device)[None, :]
    toeplitz = kernel[:, lag.clamp(min=0)] * (lag >= 0).to(kernel.dtype)  # [H, T, T]
    y = torch.einsum("hji,bcih->bcjh", toeplitz, u)

    # 2. The state each chunk leaves behind on its own: S_c = sum_j lam ** (T - 1 - j) u_{c, j}.
    pos = torch.arange(chunk, device=u.device)
    q_re, q_im = complex_powers(log_decay, freq, chunk - 1 - pos)  # [T, N]
    local = torch.einsum("bcjh,jn->bchn", u, torch.cat([q_re, q_im], dim=1))  # [B, C, H, 2N]
    local_re, local_im = local.chunk(2, dim=-1)

    # 3. Carry the state across chunks: X_c = lam ** T * X_{c-1} + S_c (sequential, elementwise).
    # unbind, not local_re[:, c]: the backward of C slices would write C full-size gradients.
    a_re, a_im = complex_powers(log_decay, freq, torch.tensor([chunk], device=u.device))  # [1, N]
    x_re, x_im = state[0], state[1]
    entering_re, entering_im = [], []
    for s_re, s_im in zip(local_re.unbind(1), local_im.unbind(1)):
        entering_re.append(x_re)
        entering_im.append(x_im)
        x_re, x_im = a_re * x_re - a_im * x_im + s_re, a_re * x_im + a_im * x_re + s_im
    prev_re, prev_im = torch.stack(entering_re, dim=1), torch.stack(entering_im, dim=1)  # [B, C, H, N]

    # 4. What the entering state adds at offset j: Re(sum_n W lam ** (j + 1) X_{c-1}).
    z_re = w_re * prev_re - w_im * prev_im
    z_im = w_re * prev_im + w_im * prev_re
    p_re, p_im = complex_powers(log_decay, freq, pos + 1)  # [T, N]
    y = y + torch.einsum("bchn,jn->bcjh", torch.cat([z_re, -z_im], dim=-1), torch.cat([p_re, p_im], dim=1))
    return y.reshape(batch, length, channels), torch.stack([x_re, x_im])


class DiagonalSSM(nn.Module):
    """DSS with Delta = 1 over `channels` channels and `state_size` complex modes.

    Initialisation (random, as the GSS paper found sufficient): exp(Lambda_re) log-uniform in
    [1/max_memory, 1] (memory of 1 to max_memory tokens; the paper's 1e-3 is 1000), exp(Lambda_im) log-uniform in [1e-3, pi] (periods from
    the whole context down to 2 tokens), C complex normal with variance 1/N (so K[h, 0] ~ N(0, 1)),
    D standard normal.
    """

    def __init__(self, channels: int, state_size: int, kernel: str = "fft", chunk_size: int = 128,
                 max_memory: float = 1000.0):
        super().__init__()
        if kernel not in ("fft", "chunked"):
            raise ValueError(f"ssm kernel must be 'fft' or 'chunked', got {kernel!r}")
        self.kernel_method, self.chunk_size = kernel, chunk_size
        self.log_neg_real = nn.Parameter(torch.empty(state_size).uniform_(-math.log(max_memory), 0.0))
        self.log_imag = nn.Parameter(torch.empty(state_size).uniform_(math.log(1e-3), math.log(math.pi)))
        self.c_re = nn.Parameter(torch.randn(channels, state_size) / math.sqrt(2 * state_size))
        self.c_im = nn.Parameter(torch.randn(channels, state_size) / math.sqrt(2 * state_size))
        self.skip = nn.Parameter(torch.randn(channels))

    @property
    def compute_dtype(self) -> torch.dtype:
        """float32 for float32/bf16/fp16 models (the SSM never runs in half precision), else float64."""
        return torch.promote_types(self.c_re.dtype, torch.float32)

    def modes(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(W_re, W_im, log|lam|, arg lam) in compute_dtype: W = C (exp(Lambda) - 1) / Lambda."""
        dtype = self.compute_dtype
        a = -torch.exp(self.log_neg_real.to(dtype))  # Re(Lambda) < 0: every mode decays
        b = torch.exp(self.log_imag.to(dtype))  # Im(Lambda)
        # exp(Lambda) - 1 with expm1 so that modes with |Lambda| << 1 keep their precision.
        num_re = torch.expm1(a) * torch.cos(b) - 2 * torch.sin(b / 2) ** 2
        num_im = torch.exp(a) * torch.sin(b)
        denom = a * a + b * b
        z_re, z_im = (num_re * a + num_im * b) / denom, (num_im * a - num_re * b) / denom
        c_re, c_im = self.c_re.to(dtype), self.c_im.to(dtype)
        return c_re * z_re - c_im * z_im, c_re * z_im + c_im * z_re, a, b

    def kernel(self, length: int) -> Tensor:
        """K [H, length]: generated at run time, so any evaluation length works zero-shot."""
        w_re, w_im, a, b = self.modes()
        return dss_kernel(w_re, w_im, a, b, length)

    def init_state(self, batch_size: int) -> SSMState:
        channels, state_size = self.c_re.shape
        return self.c_re.new_zeros(2, batch_size, channels, state_size, dtype=self.compute_dtype)

    def forward(self, u: Tensor, state: SSMState | None = None) -> tuple[Tensor, SSMState | None]:
        """u [B, L, H] -> y [B, L, H]. With a state, continue from it and return the new one."""
        with torch.autocast(device_type=u.device.type, enabled=False):
            u32, skip = u.to(self.compute_dtype), self.skip.to(self.compute_dtype)
            if state is None and self.kernel_method == "fft":
                return conv_fft(u32, self.kernel(u.shape[1]), skip).to(u.dtype), None
            w_re, w_im, a, b = self.modes()
            y, new_state = scan_chunked(u32, w_re, w_im, a, b, skip, self.chunk_size, state)
            return y.to(u.dtype), (new_state if state is not None else None)

    def step(self, u: Tensor, state: SSMState) -> tuple[Tensor, SSMState]:
        """One token: u [B, H] -> y [B, H]; O(H N) time and memory whatever the context length."""
        with torch.autocast(device_type=u.device.type, enabled=False):
            u32 = u.to(self.compute_dtype)
            w_re, w_im, a, b = self.modes()
            lam_re, lam_im = torch.exp(a) * torch.cos(b), torch.exp(a) * torch.sin(b)
            x_re = lam_re * state[0] - lam_im * state[1] + u32[..., None]
            x_im = lam_re * state[1] + lam_im * state[0]
            y = (w_re * x_re - w_im * x_im).sum(-1) + self.skip.to(u32.dtype) * u32
            return y.to(u.dtype), torch.stack([x_re, x_im])


