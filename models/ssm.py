"""The diagonal state space (DSS) layer, in real arithmetic: the GSS paper's and the DSS paper's.

Names follow the papers' pseudocode. The parameters are Lambda_re, Lambda_im [N], C_re, C_im [H, N], D [H] and,
for the DSS paper's layer (`learned_step`), log_dt [H]; they define

    Lambda = -exp(Lambda_re) + i exp(Lambda_im)       N modes shared by all channels
    Delta  = exp(log_dt)                              [H], a step per channel; GSS: Delta = 1
    W      = C (exp(Delta Lambda) - 1) / Lambda       [H, N]
    K[h, l] = Re( sum_n W[h, n] exp(Delta_h Lambda_n l) )   [H, L], the convolution kernel

and one layer maps u [B, H, L] to y = causal_conv(u, K) + D u along L. With lam = exp(Delta Lambda), the same map
is the linear recurrence

    x_t = lam x_{t-1} + u_t,   y_t = Re(sum_n W[h, n] x_t[n]) + D u_t,

which `scan_ref` and `DiagonalSSM.step` run one token at a time, and which lets a parallel pass
hand its final state to recurrent decoding.

Every complex number is a `Complex` (real part, imaginary part) pair of real tensors: torch_xla
lowers neither complex dtypes nor FFTs, so `scan_chunked` runs on TPU without a host fallback.
Note that the parameter Lambda_re is log(-Re Lambda), not Re Lambda. The functions below take the exponent per
token, Delta Lambda, as the Complex pair `Lambda`: [N] when Delta = 1 (every channel's powers are the same, and the
kernel is one matmul), [H, N] with a step per channel (generated in blocks: `per_channel_kernel`).

Ways to apply the layer, all with the same result:
  * `conv_direct`  O(L^2) materialised Toeplitz matrix: the obviously correct convolution (tests only).
  * `scan_ref`     the recurrence, token by token: the obviously correct scan (tests only).
  * `conv_fft`     O(L log L) real FFT over [B, H, L], always in float32: the paper's method, fast on CPU and GPU,
                   and with real arithmetic around the transforms, so that it compiles whole.
  * `scan_chunked` no FFT: matmuls inside chunks of T tokens and a state carried between chunks by
                   a log-depth scan (a traced graph of O(log(L / T)) ops), O(L (T + N)) work. The TPU
                   path; like `scan_ref` it starts from and returns a state.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

# (real part, imaginary part) of a complex tensor.
Complex = tuple[Tensor, Tensor]

# A recurrent state is the complex vector x per (batch, channel), stored as one real tensor
# of shape [2, B, H, N]: index 0 holds the real parts, index 1 the imaginary parts.
SSMState = Tensor

# What every decoding step of a DiagonalSSM reuses: (W lam, lam, D + Re(sum_n W)) with lam = exp(Lambda); see
# `scan_step_`.
StepConstants = tuple[Complex, Complex, Tensor]


def complex_mul(a: Complex, b: Complex) -> Complex:
    """a * b, elementwise with broadcasting."""
    return a[0] * b[0] - a[1] * b[1], a[0] * b[1] + a[1] * b[0]


def complex_mul_add(a: Complex, b: Complex, c: Complex) -> Complex:
    """a * b + c, elementwise with broadcasting. The second multiply-add runs in place on the first's
    fresh result: one new tensor per part instead of three (large fresh buffers are slow on a CPU)."""
    return (
        torch.addcmul(c[0], a[0], b[0]).addcmul_(a[1], b[1], value=-1),
        torch.addcmul(c[1], a[0], b[1]).addcmul_(a[1], b[0]),
    )


def complex_powers(Lambda: Complex, exponents: Tensor) -> Complex:
    """exp(Lambda e) = lam ** e for each exponent e: each part [len(exponents), *Lambda's shape]."""
    e = exponents.to(Lambda[0].dtype).view(-1, *[1] * Lambda[0].dim())
    magnitude = torch.exp(Lambda[0] * e)
    return magnitude * torch.cos(Lambda[1] * e), magnitude * torch.sin(Lambda[1] * e)


def dss_kernel(W: Complex, Lambda: Complex, length: int) -> Tensor:
    """K[h, l] = Re(sum_n W[h, n] exp(Lambda_{h,n} l)) for l < length: [H, length]. Lambda [N] (shared) or [H, N]."""
    if Lambda[0].dim() == 2:
        return per_channel_kernel(W, Lambda, length)
    powers = complex_powers(Lambda, torch.arange(length, device=W[0].device))
    return W[0] @ powers[0].T - W[1] @ powers[1].T


def per_channel_kernel_ref(W: Complex, Lambda: Complex, length: int) -> Tensor:
    """Reference for `per_channel_kernel`: the powers [H, N, L] whole (tests only; 17 GB at paper-dss' 4k)."""
    powers = complex_powers(Lambda, torch.arange(length, device=W[0].device))  # [L, H, N]
    return (W[0] * powers[0] - W[1] * powers[1]).sum(-1).T


def power_blocks(length: int) -> tuple[int, int]:
    """(T, A): T the power of two >= sqrt(length), A = ceil(length / T); A blocks of T powers make all up to length."""
    block = 1 << math.ceil(math.log2(length) / 2)
    return block, -(-length // block)


def _power_blocks(Lambda: Complex, length: int) -> tuple[Complex, Complex]:
    """exp(Lambda l) for l = a T + j (`power_blocks(length)`) as outer[a] * inner[j]: outer = exp(Lambda a T)
    [A, H, N] and inner = exp(Lambda j) [T, H, N], with A T >= length."""
    block, n_blocks = power_blocks(length)
    device = Lambda[0].device
    outer = complex_powers(Lambda, torch.arange(n_blocks, device=device) * block)
    return outer, complex_powers(Lambda, torch.arange(block, device=device))


def per_channel_kernel(W: Complex, Lambda: Complex, length: int, max_block_elements: int = 1 << 24) -> Tensor:
    """`per_channel_kernel_ref` without the [H, N, L] powers: K[h, a T + j] = Re(sum_n (W outer[a])[h, n] inner[j, h,
    n]) is a batched matmul over channels (`_PerChannelKernel`), run on groups of channels whose blocks hold at most
    `max_block_elements` each (64 MiB in float32): paper-dss (H = 1024, N = 512) in 2 groups at 4k, 8 at 64k."""
    channels, modes = W[0].shape
    group = max(1, max_block_elements // (modes * sum(power_blocks(length))))
    if group >= channels:
        return _PerChannelKernel.apply(*W, *Lambda, length)
    return torch.cat([_PerChannelKernel.apply(*(part[start : start + group] for part in (*W, *Lambda)), length)
                      for start in range(0, channels, group)])  # fmt: skip


class _PerChannelKernel(torch.autograd.Function):
    """K = Re(sum_n W z ** l), z = exp(Lambda) [H, N], with a backward that recomputes the blocks instead of keeping
    them: with G = dLoss/dK and S = sum_l G[h, l] z ** l, S' = sum_l G[h, l] l z ** l (the same blocked sums),
    dW = conj(S) and dLambda = conj(W S') as (re, im) pairs. Nothing of size N L is saved for the backward."""

    @staticmethod
    def forward(ctx, W_re: Tensor, W_im: Tensor, L_re: Tensor, L_im: Tensor, length: int) -> Tensor:
        outer, inner = _power_blocks((L_re, L_im), length)
        w_outer = complex_mul((W_re, W_im), outer)  # [A, H, N]
        K = torch.einsum("ahn,jhn->haj", w_outer[0], inner[0]) - torch.einsum("ahn,jhn->haj", w_outer[1], inner[1])
        ctx.save_for_backward(W_re, W_im, L_re, L_im)
        ctx.length = length
        return K.flatten(1)[:, :length]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_K: Tensor) -> tuple[Tensor | None, ...]:
        W_re, W_im, L_re, L_im = ctx.saved_tensors
        outer, inner = _power_blocks((L_re, L_im), ctx.length)
        blocks, block = outer[0].shape[0], inner[0].shape[0]
        G = torch.nn.functional.pad(grad_K, (0, blocks * block - ctx.length))
        G = torch.stack([G, G * torch.arange(blocks * block, device=G.device, dtype=G.dtype)])  # G and G l
        G = G.view(2, -1, blocks, block)
        partial = tuple(torch.einsum("khaj,jhn->kahn", G, part) for part in inner)  # sum_j G[aT + j] z ** j
        S = tuple(part.sum(1) for part in complex_mul(outer, partial))  # [2, H, N]: S and S'
        grad_W = S[0][0], -S[1][0]
        W_S = complex_mul((W_re, W_im), (S[0][1], S[1][1]))
        return *grad_W, W_S[0], -W_S[1], None


def conv_direct(u: Tensor, K: Tensor, D: Tensor) -> Tensor:
    """Reference: y[b, h, t] = sum_{s <= t} K[h, t - s] u[b, h, s] + D[h] u[b, h, t], for u [B, H, L]."""
    length = u.shape[-1]
    lag = torch.arange(length)[:, None] - torch.arange(length)[None, :]  # [t, s]
    toeplitz = K[:, lag.clamp(min=0)] * (lag >= 0)  # [H, t, s]
    return torch.einsum("hts,bhs->bht", toeplitz, u) + D[:, None] * u


def fft_size(length: int) -> int:
    """The power of two >= 2 L: a circular convolution that long is the causal one (nothing wraps around), and the
    transform of a power of two runs the fastest radix-2 plans (cuFFT and pocketfft)."""
    return 1 << (2 * length - 1).bit_length()


def conv_fft(u: Tensor, K: Tensor, D: Tensor) -> Tensor:
    """`conv_direct` by real FFT over the last, contiguous dimension of u [B, H, L]: float32 whatever the input.

    D rides in the kernel's first tap (one multiply-add fewer over u), and the convolution and its backward
    (`_FFTConv`) use real FFTs and real arithmetic only, so that compiled, no complex op falls back to eager."""
    dtype = torch.promote_types(u.dtype, torch.float32)
    K = K.to(dtype)
    taps = torch.cat([K[:, :1] + D.to(dtype)[:, None], K[:, 1:]], dim=1)
    return _FFTConv.apply(u.to(dtype), taps)


def _spectral_product(a: Tensor, b: Tensor, conjugate_b: bool = False, sum_batch: bool = False) -> Tensor:
    """a * b (or a * conj(b)) of two spectra, summed over dim 0 if asked, as a complex tensor for irfft: computed on
    their real views (one fused kernel compiled; Inductor generates no code for complex arithmetic)."""
    (a_re, a_im), (b_re, b_im) = torch.view_as_real(a).unbind(-1), torch.view_as_real(b).unbind(-1)
    if conjugate_b:
        b_im = -b_im
    product = torch.stack([a_re * b_re - a_im * b_im, a_re * b_im + a_im * b_re], dim=-1)
    return torch.view_as_complex(product.sum(0) if sum_batch else product)


class _FFTConv(torch.autograd.Function):
    """y = causal_conv(u, K) for u [B, H, L], K [H, L], with a backward written out (H3's fftconv):
    grad_u = corr(grad_y, K) and grad_K = sum_b corr(grad_y, u), correlations being products with the conjugate
    spectrum. The spectra of u and K are kept from the forward, and grad_K is summed over the batch before its
    inverse transform: a forward + backward runs 4 transforms of [B, H, n] and 2 of [H, n], all real-to-complex or
    complex-to-real, with real arithmetic between them (autograd's backward runs complex-to-complex transforms,
    conjugates, complex multiplies and copies, which Inductor leaves to eager)."""

    @staticmethod
    def forward(ctx, u: Tensor, K: Tensor) -> Tensor:
        length = u.shape[-1]
        n = fft_size(length)
        u_f, k_f = torch.fft.rfft(u, n=n), torch.fft.rfft(K, n=n)
        ctx.save_for_backward(u_f, k_f)
        return torch.fft.irfft(_spectral_product(u_f, k_f), n=n)[..., :length]

    @staticmethod
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor, Tensor]:
        u_f, k_f = ctx.saved_tensors
        length = grad_y.shape[-1]
        n = fft_size(length)
        g_f = torch.fft.rfft(grad_y, n=n)
        grad_u = torch.fft.irfft(_spectral_product(g_f, k_f, conjugate_b=True), n=n)[..., :length]
        grad_k_f = _spectral_product(g_f, u_f, conjugate_b=True, sum_batch=True)
        grad_K = torch.fft.irfft(grad_k_f, n=n)[..., :length]
        return grad_u, grad_K


def zero_state(u: Tensor, W: Complex) -> SSMState:
    """The state before the first token, for inputs u [B, L, H]."""
    return u.new_zeros(2, u.shape[0], u.shape[2], W[0].shape[1])


def scan_step(u: Tensor, W: Complex, lam: Complex, D: Tensor, state: SSMState) -> tuple[Tensor, SSMState]:
    """One token of the recurrence, lam = exp(Lambda) [1, N] or [1, H, N]: u [B, H] -> (y [B, H], new state); O(H N)
    whatever came before."""
    x_re, x_im = complex_mul(lam, (state[0], state[1]))
    x_re = x_re + u[..., None]
    y = (W[0] * x_re - W[1] * x_im).sum(-1) + D * u  # Re(sum_n W x)
    return y, torch.stack([x_re, x_im])


def scan_step_(u: Tensor, constants: StepConstants, state: SSMState) -> Tensor:
    """`scan_step` with the state updated in place, in one pass over it: y is read off the state before the update,

        y_t = Re(sum_n W (lam x_{t-1} + u_t)) + D u_t = Re(sum_n (W lam) x_{t-1}) + (Re(sum_n W) + D) u_t,

    so the new state is written once and never read back (compiled, the sum fuses with the layer's other pointwise
    work and the update with a later kernel: about 3 passes over the state, where `scan_step` made 5)."""
    w_lam, lam, skip = constants
    x_re, x_im = state[0], state[1]
    y = (w_lam[0] * x_re - w_lam[1] * x_im).sum(-1) + skip * u
    new = torch.stack([lam[0] * x_re - lam[1] * x_im + u[..., None], lam[0] * x_im + lam[1] * x_re])
    state.copy_(new)
    return y


def scan_ref(
    u: Tensor, W: Complex, Lambda: Complex, D: Tensor, state: SSMState | None = None
) -> tuple[Tensor, SSMState]:
    """Reference: `scan_step` over u [B, L, H] token by token; returns (y [B, L, H], final state)."""
    if state is None:
        state = zero_state(u, W)
    lam = complex_powers(Lambda, torch.ones(1, device=u.device))
    ys = []
    for u_t in u.unbind(1):
        y_t, state = scan_step(u_t, W, lam, D, state)
        ys.append(y_t)
    return torch.stack(ys, dim=1), state


def scan_chunked(
    u: Tensor, W: Complex, Lambda: Complex, D: Tensor, state: SSMState | None = None, chunk_size: int = 128
) -> tuple[Tensor, SSMState]:
    """`scan_ref` without FFT or a per-token loop: (y [B, L, H], final state).

    Full chunks run together; a shorter last chunk runs as one chunk of its own length, so the
    final state is exact for any L (padding at the end would decay the state by the pad length).
    """
    if state is None:
        state = zero_state(u, W)
    length = u.shape[1]
    full = (length // chunk_size) * chunk_size
    pieces = []
    if full:
        y, state = _scan_chunks(u[:, :full], W, Lambda, chunk_size, state)
        pieces.append(y)
    if full < length:
        y, state = _scan_chunks(u[:, full:], W, Lambda, length - full, state)
        pieces.append(y)
    y = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
    return y + D * u, state


def _scan_chunks(u: Tensor, W: Complex, Lambda: Complex, chunk: int, state: SSMState) -> tuple[Tensor, SSMState]:
    """scan_chunked without the D term, for L a multiple of `chunk`."""
    batch, length, channels = u.shape
    n_chunks = length // chunk
    u = u.reshape(batch, n_chunks, chunk, channels)

    # 1. Inside each chunk: a [T, T] lower-triangular Toeplitz matmul per channel.
    K = dss_kernel(W, Lambda, chunk)  # [H, T]
    lag = torch.arange(chunk, device=u.device)[:, None] - torch.arange(chunk, device=u.device)[None, :]
    # index_select, not K[:, lag]: its backward (index_add) makes the whole build half as costly as index_put's.
    toeplitz = K.index_select(1, lag.clamp(min=0).flatten()).view(channels, chunk, chunk)
    toeplitz = toeplitz * (lag >= 0).to(K.dtype)  # [H, T, T]
    y = torch.einsum("hji,bcih->bcjh", toeplitz, u)

    # 2. The state each chunk leaves behind on its own: S_c = sum_j lam ** (T - 1 - j) u_{c, j}.
    pos = torch.arange(chunk, device=u.device)
    powers = "jn" if Lambda[0].dim() == 1 else "jhn"  # lam ** j [T, N], or [T, H, N] with a step per channel
    # Two einsums, not one over cat(q): the backward would cat their gradients, a copy of [B, C, H, 2N].
    local = tuple(torch.einsum(f"bcjh,{powers}->bchn", u, q) for q in complex_powers(Lambda, chunk - 1 - pos))

    # 3. Carry the state across chunks: the state entering chunk c is x_{c-1}, where
    # x_c = lam ** T x_{c-1} + S_c and x_{-1} is the starting state.
    lam_T = complex_powers(Lambda, torch.full((1,), chunk, device=u.device))  # [1, N] or [1, H, N]
    prev = _EnteringStates.apply(*local, *lam_T, state[0], state[1])  # [B, C, H, N] each
    last = complex_mul_add(lam_T, (prev[0][:, -1], prev[1][:, -1]), (local[0][:, -1], local[1][:, -1]))

    # 4. What the entering state adds at offset j: Re(sum_n W lam ** (j + 1) x_{c-1}).
    z_re, z_im = complex_mul(W, prev)
    p_re, p_im = complex_powers(Lambda, pos + 1)
    y = y + torch.einsum(f"bchn,{powers}->bcjh", z_re, p_re) - torch.einsum(f"bchn,{powers}->bcjh", z_im, p_im)
    return y.reshape(batch, length, channels), torch.stack(last)


def _entering_states(x: Complex, a: Complex, initial: Complex) -> Complex:
    """E_0 = initial, E_c = a E_{c-1} + x_{c-1} for c < C, along dim 1 of x [B, C, ...]; a [1, N] or [1, H, N].

    Log-depth instead of a loop over c, so that a traced (XLA) graph holds O(log C) levels, not C
    steps: a pair of neighbours acts as one step with factor a ** 2 and input a x_{2i} + x_{2i+1}, so
    the states entering the pairs are this same function at half the length, and
    E_{2i+1} = a E_{2i} + x_{2i} fills in the rest. O(C) work in all. No division, so powers of a that
    underflow to 0 (fast modes, long strides) are harmless.
    """
    length = x[0].shape[1]
    if length == 1:
        return initial[0][:, None], initial[1][:, None]
    if length % 2:  # one more input, which only the dropped E_C would see
        padded = tuple(torch.cat([part, torch.zeros_like(part[:, :1])], dim=1) for part in x)
        return tuple(part[:, :-1] for part in _entering_states(padded, a, initial))
    even_re, odd_re = x[0].unflatten(1, (length // 2, 2)).unbind(2)
    even_im, odd_im = x[1].unflatten(1, (length // 2, 2)).unbind(2)
    pairs = complex_mul_add(a, (even_re, even_im), (odd_re, odd_im))
    at_even = _entering_states(pairs, complex_mul(a, a), initial)
    at_odd = complex_mul_add(a, at_even, (even_re, even_im))
    return tuple(torch.stack([e, o], dim=2).flatten(1, 2) for e, o in zip(at_even, at_odd))


class _EnteringStates(torch.autograd.Function):
    """`_entering_states` with its arguments as separate real tensors, and a backward written out.

    The adjoint of E_c = a E_{c-1} + x_{c-1} is the same recurrence run backwards with conj(a): with
    G the gradient arriving at E, x_k gets R_{k+1}, where R_c = G_c + conj(a) R_{c+1} (R_C = 0); the
    initial state gets R_0, and a gets sum_k R_{k+1} conj(E_k). That is one more scan and one product,
    where autograd would revisit every level's temporaries: measured at H=256, N=512, that made the
    layer's forward + backward 8% (4k tokens) to 15% (64k) slower on a CPU, and its XLA graph a third
    larger.
    """

    @staticmethod
    def forward(ctx, x_re: Tensor, x_im: Tensor, a_re: Tensor, a_im: Tensor, init_re: Tensor,
                init_im: Tensor) -> Complex:  # fmt: skip
        states = _entering_states((x_re, x_im), (a_re, a_im), (init_re, init_im))
        ctx.save_for_backward(a_re, a_im, *states)
        return states

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_re: Tensor, g_im: Tensor) -> tuple[Tensor, ...]:
        a_re, a_im, E_re, E_im = ctx.saved_tensors
        conj_a = a_re, -a_im
        # R_{k+1} = sum_{j > k} conj(a) ** (j - 1 - k) G_j: the same scan over G reversed, reversed back.
        zero = g_re.new_zeros(g_re[:, 0].shape)
        reversed_R = _entering_states((g_re.flip(1), g_im.flip(1)), conj_a, (zero, zero))
        gx_re, gx_im = (part.flip(1) for part in reversed_R)  # gx_{C-1} = 0: no state here sees x_{C-1}
        ginit_re, ginit_im = complex_mul_add(conj_a, (gx_re[:, 0], gx_im[:, 0]), (g_re[:, 0], g_im[:, 0]))
        # gx_k conj(E_k) summed down to a's shape ([1, N] or [1, H, N]), through one buffer of E's size
        product = torch.mul(E_re, gx_re).addcmul_(E_im, gx_im)
        ga_re = product.sum_to_size(a_re.shape)
        ga_im = torch.mul(E_re, gx_im, out=product).addcmul_(E_im, gx_re, value=-1).sum_to_size(a_im.shape)
        return gx_re, gx_im, ga_re, ga_im, ginit_re, ginit_im


class DiagonalSSM(nn.Module):
    """DSS over `channels` channels (H) and `state_size` complex modes (N): the GSS paper's (Delta = 1), or with
    `learned_step` the DSS paper's (Gupta et al. 2022, DSS_exp), which learns a step Delta per channel.

    Initialisation, Delta = 1 (random, as the GSS paper found sufficient): exp(Lambda_re) log-uniform in
    [1/max_memory, 1] (memory of 1 to max_memory tokens; the paper's 1e-3 is 1000), exp(Lambda_im) log-uniform in
    [1e-3, pi] (periods from the whole context down to 2 tokens). With a learned step (the DSS paper's): Delta
    log-uniform in [1/max_memory, 100/max_memory], timescales 1/Delta of max_memory / 100 to max_memory tokens (at
    the default 1000 the DSS paper's [1e-3, 1e-1]), and Lambda_n = -1/2 + i pi (n + 1/2), S4D-Lin's approximation
    of DSS's skew-HiPPO modes (the half keeps every imaginary part positive, which its log parameter needs). Both:
    C complex normal with
    variance 1/N (so K[h, 0] ~ N(0, 1) at Delta = 1; taps scale with Delta, their sum over a channel's memory
    does not), D standard normal.

    Every parameter carries `_no_weight_decay = True`, which the optimizer reads: decay would pull
    Lambda_re towards 0, a memory of about one token, whatever the data says.
    """

    def __init__(self, channels: int, state_size: int, kernel: str = "fft", chunk_size: int = 128,
                 max_memory: float = 1000.0, learned_step: bool = False):  # fmt: skip
        super().__init__()
        if kernel not in ("fft", "chunked"):
            raise ValueError(f"ssm kernel must be 'fft' or 'chunked', got {kernel!r}")
        self.kernel_method, self.chunk_size = kernel, chunk_size
        if learned_step:
            self.Lambda_re = nn.Parameter(torch.full((state_size,), math.log(0.5)))
            self.Lambda_im = nn.Parameter(torch.log(math.pi * (torch.arange(state_size) + 0.5)))
        else:
            self.Lambda_re = nn.Parameter(torch.empty(state_size).uniform_(-math.log(max_memory), 0.0))
            self.Lambda_im = nn.Parameter(torch.empty(state_size).uniform_(math.log(1e-3), math.log(math.pi)))
        self.C_re = nn.Parameter(torch.randn(channels, state_size) / math.sqrt(2 * state_size))
        self.C_im = nn.Parameter(torch.randn(channels, state_size) / math.sqrt(2 * state_size))
        self.D = nn.Parameter(torch.randn(channels))
        if learned_step:
            log_steps = -math.log(max_memory), math.log(100 / max_memory)
            self.log_dt = nn.Parameter(torch.empty(channels).uniform_(*log_steps))
            self.register_load_state_dict_pre_hook(step_of_one_for_older_weights)
        else:
            self.register_parameter("log_dt", None)
        self._mark_no_weight_decay()

    def _mark_no_weight_decay(self) -> None:
        for p in self.parameters(recurse=False):
            p._no_weight_decay = True

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> DiagonalSSM:
        # Moving to a device with another tensor type (XLA) makes new Parameters, without the flag.
        super()._apply(fn, recurse)
        self._mark_no_weight_decay()
        return self

    @property
    def compute_dtype(self) -> torch.dtype:
        """float32 for float32/bf16/fp16 models (the SSM never runs in half precision), else float64."""
        return torch.promote_types(self.C_re.dtype, torch.float32)

    def modes(self) -> tuple[Complex, Complex]:
        """(W, Delta Lambda) in compute_dtype: Delta Lambda [N] with Delta = 1, else [H, N]."""
        dtype = self.compute_dtype
        Lambda = (-torch.exp(self.Lambda_re.to(dtype)), torch.exp(self.Lambda_im.to(dtype)))  # Re < 0: decays
        if self.log_dt is None:
            re, im = step = Lambda
        else:
            delta = torch.exp(self.log_dt.to(dtype))[:, None]
            re, im = step = Lambda[0] * delta, Lambda[1] * delta
        # exp(Delta Lambda) - 1 with expm1, so that modes with |Delta Lambda| << 1 keep their precision.
        exp_minus_one = (torch.expm1(re) * torch.cos(im) - 2 * torch.sin(im / 2) ** 2, torch.exp(re) * torch.sin(im))
        abs2 = Lambda[0] ** 2 + Lambda[1] ** 2
        ratio = complex_mul(exp_minus_one, (Lambda[0] / abs2, -Lambda[1] / abs2))  # (exp(Delta Lambda) - 1) / Lambda
        W = complex_mul((self.C_re.to(dtype), self.C_im.to(dtype)), ratio)
        return W, step

    def kernel(self, length: int) -> Tensor:
        """K [H, length]: generated at run time, so any evaluation length works zero-shot."""
        W, Lambda = self.modes()
        return dss_kernel(W, Lambda, length)

    def init_state(self, batch_size: int) -> SSMState:
        channels, state_size = self.C_re.shape
        return self.C_re.new_zeros(2, batch_size, channels, state_size, dtype=self.compute_dtype)

    def forward(self, u: Tensor, state: SSMState | None = None) -> tuple[Tensor, SSMState | None]:
        """u [B, H, L] -> y [B, H, L], over the contiguous last dimension. With a state, continue from it and
        return the new one (the chunked scan, which works on [B, L, H]: these transposes are views)."""
        with torch.autocast(device_type=u.device.type, enabled=False):
            u32, D = u.to(self.compute_dtype), self.D.to(self.compute_dtype)
            if state is None and self.kernel_method == "fft":
                return conv_fft(u32, self.kernel(u.shape[-1]), D).to(u.dtype), None
            W, Lambda = self.modes()
            y, new_state = scan_chunked(u32.mT, W, Lambda, D, state, self.chunk_size)
            return y.mT.to(u.dtype), (new_state if state is not None else None)

    def step_constants(self) -> StepConstants:
        """(W lam, lam, D + Re(sum_n W)) in compute_dtype, lam = exp(Delta Lambda) [1, N] or [1, H, N]: the same for
        every token of a decode, so computed once for it."""
        with torch.autocast(device_type=self.D.device.type, enabled=False):
            W, Lambda = self.modes()
            lam = complex_powers(Lambda, torch.ones(1, device=self.D.device))
            return complex_mul(W, lam), lam, self.D.to(self.compute_dtype) + W[0].sum(-1)

    def step(self, u: Tensor, state: SSMState, constants: StepConstants | None = None) -> Tensor:
        """One token: u [B, H] -> y [B, H], and `state` moves on by that token, in place; O(H N) time and memory
        whatever the context length."""
        with torch.autocast(device_type=u.device.type, enabled=False):
            y = scan_step_(u.to(self.compute_dtype), constants or self.step_constants(), state)
            return y.to(u.dtype)


def step_of_one_for_older_weights(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *_: object) -> None:
    """Weights of DSS layers saved before they learned a step (commits up to 1678b3f) load with Delta = 1, the step
    they were trained with: checkpoints, registered models and exports of older runs load, and compute the same."""
    if f"{prefix}Lambda_re" in state_dict and f"{prefix}log_dt" not in state_dict:
        state_dict[f"{prefix}log_dt"] = torch.zeros_like(module.D)
