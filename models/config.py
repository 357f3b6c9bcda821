"""One dataclass describes every model; presets name the paper's sizes and small ones for CPUs."""

from __future__ import annotations

import typing
from dataclasses import dataclass, replace
from typing import Literal

Arch = Literal["gss", "dss", "transformer", "hybrid"]
SSMKernel = Literal["fft", "chunked"]
ARCHS: tuple[str, ...] = typing.get_args(Arch)
SSM_KERNELS: tuple[str, ...] = typing.get_args(SSMKernel)


@dataclass(frozen=True)
class ModelConfig:
    """The architecture and its sizes; `__post_init__` refuses a config no model can be built from."""

    arch: Arch = "gss"
    """gss | dss (DSS over E plus an MLP per block) | transformer | hybrid (GSS with local-attention layers)."""
    vocab_size: int = 32_000
    """Token ids are in [0, vocab_size); the pipeline sets it from the dataset's tokenizer."""
    d_model: int = 1024
    """E: the residual stream."""
    n_layers: int = 16
    """Blocks in the stack (0: embeddings and output head only)."""
    d_gate: int = 4096
    """F: GSS gate branch width; also the MLP width of DSS and attention blocks."""
    d_ssm: int = 256
    """H: GSS channels fed to the state space (DSS blocks use d_model)."""
    state_size: int = 512
    """N: complex modes per DSS kernel."""
    ssm_kernel: SSMKernel = "fft"
    """fft (real FFT) | chunked (no FFT: matmuls + carried state; TPU)."""
    ssm_chunk: int = 128
    """Tokens per chunk of the chunked kernel."""
    ssm_max_memory: float = 1000.0
    """The longest timescale at init, in tokens: GSS's decay rates are log-uniform in [1/this, 1], DSS's steps in
    [1/this, 100/this] (the default 1000 is both papers': GSS's 1e-3, DSS's [1e-3, 1e-1])."""
    n_heads: int = 16
    """Attention heads (transformer, hybrid)."""
    attn_chunk: int = 512
    """Hybrid: attention within non-overlapping chunks of this many tokens."""
    attn_every: int = 4
    """Hybrid: every k-th layer is a local-attention block."""
    rope_base: float = 10_000.0
    """RoPE's base: channel pair i of a head turns at base^(-i / pairs) radians per token (transformer, hybrid)."""
    tie_embeddings: bool = True
    """The output head shares the embedding matrix."""
    init_std: float = 0.02
    """Standard deviation of the normal init of embeddings and linear weights."""

    def __post_init__(self) -> None:
        """Each message starts with the field's name, so the pipeline can prefix its key (train.model.)."""
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.ssm_kernel not in SSM_KERNELS:
            raise ValueError(f"ssm_kernel must be one of {', '.join(SSM_KERNELS)}, got {self.ssm_kernel!r}")
        sizes = ("vocab_size", "d_model", "d_gate", "d_ssm", "state_size", "ssm_chunk", "n_heads", "attn_chunk",
                 "attn_every")  # fmt: skip
        for name in sizes:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be at least 1")
        if self.n_layers < 0:
            raise ValueError(f"n_layers={self.n_layers}: must be at least 0 (0: embeddings and output head only)")
        if self.ssm_max_memory < 1:
            raise ValueError(f"ssm_max_memory={self.ssm_max_memory}: must be at least 1 (a memory in tokens)")
        if self.rope_base <= 1:
            raise ValueError(f"rope_base={self.rope_base}: must be greater than 1")
        if self.init_std <= 0:
            raise ValueError(f"init_std={self.init_std}: must be greater than 0")
        if self.arch in ("transformer", "hybrid"):
            head_width, rest = divmod(self.d_model, self.n_heads)
            if rest or head_width % 2:
                raise ValueError(f"d_model={self.d_model}: must be n_heads={self.n_heads} times an even head width "
                                 "(RoPE rotates pairs of channels)")

    def layer_kinds(self) -> list[str]:
        """The block type of each layer, bottom to top."""
        if self.arch == "hybrid":
            return ["local_attention" if (i + 1) % self.attn_every == 0 else "gss" for i in range(self.n_layers)]
        return [{"gss": "gss", "dss": "dss", "transformer": "attention"}[self.arch]] * self.n_layers


_PAPER = ModelConfig(arch="gss", vocab_size=32_000, d_model=1024, n_layers=16, d_gate=4096, d_ssm=256, state_size=512)
_SMALL = ModelConfig(
    arch="gss", vocab_size=8192, d_model=256, n_layers=4, d_gate=1024, d_ssm=64, state_size=64,
    n_heads=4, attn_chunk=128, ssm_chunk=64,
)  # fmt: skip

# Paper presets of about the same size (184-203M parameters with the 32k vocabulary, embeddings
# tied): GSS 16 layers; DSS blocks (DSS over E with a GLU, plus an MLP 7/8 as wide, which pays for the GLU)
# 15 layers; Transformer 12 layers;
# the hybrid replaces every 4th GSS layer by a chunked-attention block (small: the 4th of 4). Counts: `gss params`.
PRESETS: dict[str, ModelConfig] = {
    "paper-gss": _PAPER,
    "paper-gss-hybrid": replace(_PAPER, arch="hybrid"),
    "paper-dss": replace(_PAPER, arch="dss", n_layers=15, d_gate=3584),
    "paper-transformer": replace(_PAPER, arch="transformer", n_layers=12),
    "small-gss": _SMALL,
    "small-gss-hybrid": replace(_SMALL, arch="hybrid"),
    "small-dss": replace(_SMALL, arch="dss", d_gate=896),
    "small-transformer": replace(_SMALL, arch="transformer", n_layers=3),
}
