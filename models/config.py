"""One dataclass describes every model; presets name the paper's sizes and small ones for CPUs."""

from __future__ import annotations

from dataclasses import dataclass, replace

ARCHS = ("gss", "dss", "transformer", "hybrid")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "gss"  # "gss" | "dss" | "transformer" | "hybrid"
    vocab_size: int = 32_000
    d_model: int = 1024  # E: the residual stream
    n_layers: int = 16
    d_gate: int = 4096  # F: GSS gate branch width; also the MLP width of DSS and attention blocks
    d_ssm: int = 256  # H: GSS channels fed to the state space (DSS blocks use d_model)
    state_size: int = 512  # N: complex modes per DSS kernel
    ssm_kernel: str = "fft"  # "fft" (real FFT) | "chunked" (no FFT: matmuls + carried state; TPU)
    ssm_chunk: int = 128  # tokens per chunk of the chunked kernel
    # the slowest mode's memory at init, in tokens (decay rates log-uniform in [1/this, 1]); the paper's 1000
    ssm_max_memory: float = 1000.0
    n_heads: int = 16  # attention heads (transformer, hybrid)
    attn_chunk: int = 512  # hybrid: attention within non-overlapping chunks of this many tokens
    attn_every: int = 4  # hybrid: every k-th layer is a local-attention block
    rope_base: float = 10_000.0
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.ssm_kernel not in ("fft", "chunked"):
            raise ValueError(f"ssm_kernel must be 'fft' or 'chunked', got {self.ssm_kernel!r}")
        if self.arch in ("transformer", "hybrid") and self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")

    def layer_kinds(self) -> list[str]:
        """The block type of each layer, bottom to top."""
        if self.arch == "hybrid":
            return ["local_attention" if (i + 1) % self.attn_every == 0 else "gss" for i in range(self.n_layers)]
        return [{"gss": "gss", "dss": "dss", "transformer": "attention"}[self.arch]] * self.n_layers


_PAPER = ModelConfig(arch="gss", vocab_size=32_000, d_model=1024, n_layers=16, d_gate=4096, d_ssm=256, state_size=512)
_SMALL = ModelConfig(
    arch="gss", vocab_size=8192, d_model=256, n_layers=4, d_gate=1024, d_ssm=64, state_size=64,
    n_heads=4, attn_chunk=128, attn_every=2, ssm_chunk=64,
)  # fmt: skip

# Paper presets of about the same size (184-203M parameters with the 32k vocabulary, embeddings
# tied): GSS 16 layers; DSS blocks (DSS over E plus an MLP) 15 layers; Transformer 12 layers;
# the hybrid replaces every 4th GSS layer by a chunked-attention block. Counts: `gss params`.
PRESETS: dict[str, ModelConfig] = {
    "paper-gss": _PAPER,
    "paper-gss-hybrid": replace(_PAPER, arch="hybrid"),
    "paper-dss": replace(_PAPER, arch="dss", n_layers=15),
    "paper-transformer": replace(_PAPER, arch="transformer", n_layers=12),
    "small-gss": _SMALL,
    "small-gss-hybrid": replace(_SMALL, arch="hybrid"),
    "small-dss": replace(_SMALL, arch="dss"),
    "small-transformer": replace(_SMALL, arch="transformer", n_layers=3),
}
