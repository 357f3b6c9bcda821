"""GSS, DSS, Transformer and GSS-Hybrid language models.

Every block has the same two entry points:
  forward(x, state=None, position=0) -> (x, state)   parallel over a piece of L tokens. Without a state
                                                      it is the training pass; with one it continues
                                                      from it (prompt prefill, long-context evaluation
                                                      in pieces) and returns the state after the piece.
  step(x, state, position) -> (x, state)             one token, for recurrent decoding.
`position` is the absolute index of the first token, which attention needs for RoPE and chunk edges.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .ssm import DiagonalSSM, StepConstants


class SSMBlock(nn.Module):
    """A block around a DiagonalSSM `self.ssm`: `mix(x, run_ssm)` is the block, and the parallel
    pass and the recurrent step differ only in how the SSM is run."""

    ssm: DiagonalSSM

    def mix(self, x: Tensor, run_ssm: Callable[[Tensor], tuple[Tensor, Any]]) -> tuple[Tensor, Any]:
        raise NotImplementedError

    def forward(self, x: Tensor, state: Tensor | None = None, position: int = 0) -> tuple[Tensor, Any]:
        return self.mix(x, lambda u: self.ssm(u, state))

    def step(self, x: Tensor, state: Tensor, position: int, constants: StepConstants | None = None
             ) -> tuple[Tensor, Any]:
        return self.mix(x, lambda u: self.ssm.step(u, state, constants))

    def step_constants(self) -> StepConstants:
        return self.ssm.step_constants()

    def init_state(self, batch_size: int) -> Tensor:
        return self.ssm.init_state(batch_size)


class GSSBlock(SSMBlock):
    """The Gated State Space layer, as the paper's pseudocode:

    v = GELU(x W_F); u = GELU(x W_H); y = DSS(LayerNorm(u)); out = ((y W_HF) * v) W_FE + shortcut.
    The state space works on only H << E channels; the wide gate v carries the rest.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.to_gate = nn.Linear(cfg.d_model, cfg.d_gate)
        self.to_ssm = nn.Linear(cfg.d_model, cfg.d_ssm)
        self.ssm_norm = nn.LayerNorm(cfg.d_ssm)  # the paper's dss() normalises its input
        self.ssm = DiagonalSSM(cfg.d_ssm, cfg.state_size, cfg.ssm_kernel, cfg.ssm_chunk, cfg.ssm_max_memory)
        self.ssm_out = nn.Linear(cfg.d_ssm, cfg.d_gate)
        self.out = nn.Linear(cfg.d_gate, cfg.d_model)

    def mix(self, x: Tensor, run_ssm: Callable[[Tensor], tuple[Tensor, Any]]) -> tuple[Tensor, Any]:
        h = self.norm(x)
        v = F.gelu(self.to_gate(h))
        y, state = run_ssm(self.ssm_norm(F.gelu(self.to_ssm(h))))
        return x + self.out(self.ssm_out(y) * v), state


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.up = nn.Linear(cfg.d_model, cfg.d_gate)
        self.out = nn.Linear(cfg.d_gate, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.out(F.gelu(self.up(self.norm(x))))


class DSSBlock(SSMBlock):
    """The DSS baseline the paper compares with: DSS over all E channels, then an MLP.

    x + GLU(W_o GELU(DSS(LayerNorm(x)))), followed by a pre-LN MLP of width F. The GLU after the SSM is the
    S4/DSS language-model block's (`postact: glu`); without it the block mixes tokens only through a fixed
    per-channel filter, and learns markedly slower (BENCHMARKS.md section 10).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.ssm = DiagonalSSM(cfg.d_model, cfg.state_size, cfg.ssm_kernel, cfg.ssm_chunk, cfg.ssm_max_memory)
        self.out = nn.Linear(cfg.d_model, 2 * cfg.d_model)  # value and gate halves of the GLU
        self.mlp = MLP(cfg)

    def mix(self, x: Tensor, run_ssm: Callable[[Tensor], tuple[Tensor, Any]]) -> tuple[Tensor, Any]:
        y, state = run_ssm(self.norm(x))
        value, gate = self.out(F.gelu(y)).chunk(2, dim=-1)
        # spelled out rather than F.glu: PyTorch/XLA has no lowering for glu's backward (it falls back to the host)
        return self.mlp(x + value * torch.sigmoid(gate)), state


def rotary(x: Tensor, positions: Tensor, base: float) -> Tensor:
    """RoPE on x [B, heads, L, d] at integer positions [L] (rotate-half form)."""
    half = x.shape[-1] // 2
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angle = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class AttentionBlock(nn.Module):
    """Pre-LN Transformer block: causal multi-head attention with RoPE, then an MLP.

    With `chunk` set it is the GSS-Hybrid's local attention: the sequence is cut into
    non-overlapping chunks of `chunk` tokens and a token attends only to earlier tokens of its own
    chunk, so its cache never holds more than `chunk - 1` tokens. RoPE uses the position inside the
    chunk, which is exact (attention only sees differences) and keeps angles small at any length.
    The state is a (keys, values) cache, each [B, heads, cached, d].
    """

    def __init__(self, cfg: ModelConfig, chunk: int | None = None):
        super().__init__()
        self.n_heads, self.chunk, self.rope_base = cfg.n_heads, chunk, cfg.rope_base
        self.norm = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        self.mlp = MLP(cfg)

    def _rope_positions(self, positions: Tensor) -> Tensor:
        return positions if self.chunk is None else positions % self.chunk

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None, position: int = 0):
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm(x)).view(batch, length, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        positions = torch.arange(position, position + length, device=x.device)
        q = rotary(q, self._rope_positions(positions), self.rope_base)
        k = rotary(k, self._rope_positions(positions), self.rope_base)
        if state is None:
            y = self._attend_fresh(q, k, v, position)
        else:
            y, state = self._attend_cached(q, k, v, state, position)
        y = y.transpose(1, 2).reshape(batch, length, width)
        return self.mlp(x + self.out(y)), state

    def _attend_fresh(self, q: Tensor, k: Tensor, v: Tensor, position: int) -> Tensor:
        """Training pass from position 0: causal attention, per chunk for local attention."""
        if position != 0:
            raise ValueError("a stateless attention pass starts at position 0; pass a state to continue")
        length = q.shape[2]
        chunk = self.chunk or length
        if length <= chunk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        # Pad the end to whole chunks (causal, so padding never reaches real tokens), fold the
        # chunks into the batch, attend inside each, and unfold.
        pad = -length % chunk
        b, h, _, d = q.shape
        folded = [F.pad(t, (0, 0, 0, pad)).reshape(b, h, -1, chunk, d).transpose(1, 2).reshape(-1, h, chunk, d)
                  for t in (q, k, v)]  # fmt: skip
        y = F.scaled_dot_product_attention(*folded, is_causal=True)
        return y.reshape(b, -1, h, chunk, d).transpose(1, 2).reshape(b, h, -1, d)[:, :, :length]

    def _attend_cached(self, q: Tensor, k: Tensor, v: Tensor, cache: tuple[Tensor, Tensor], position: int):
        """Continue after `cache`: keys are the cached ones followed by this piece's."""
        k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        end = position + q.shape[2]
        query_pos = torch.arange(position, end, device=q.device)[:, None]
        key_pos = torch.arange(end - k.shape[2], end, device=q.device)[None, :]
        mask = key_pos <= query_pos
        if self.chunk is not None:
            mask &= key_pos // self.chunk == query_pos // self.chunk
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        keep = k.shape[2] if self.chunk is None else end % self.chunk  # the tokens of the open chunk
        return y, (k[:, :, k.shape[2] - keep :], v[:, :, v.shape[2] - keep :])

    def step(self, x: Tensor, state: tuple[Tensor, Tensor], position: int, constants: None = None):
        y, state = self.forward(x[:, None], state, position)
        return y[:, 0], state

    def step_constants(self) -> None:
        return None  # nothing to precompute: the cache is the state

    def init_state(self, batch_size: int) -> tuple[Tensor, Tensor]:
        head_dim = self.qkv.in_features // self.n_heads
        empty = self.qkv.weight.new_zeros(batch_size, self.n_heads, 0, head_dim)
        return empty, empty


@dataclass
class DecodeState:
    """Where a recurrent pass stands: the next token's position and each layer's state; and, from the first
    step on, each layer's step constants (`step_constants`), so a decode computes them once. A DecodeState
    belongs to the weights it started with."""

    position: int
    layers: list[Any]
    constants: list[Any] | None = None


class LanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        builders = {
            "gss": lambda: GSSBlock(cfg),
            "dss": lambda: DSSBlock(cfg),
            "attention": lambda: AttentionBlock(cfg),
            "local_attention": lambda: AttentionBlock(cfg, chunk=cfg.attn_chunk),
        }
        self.blocks = nn.ModuleList(builders[kind]() for kind in cfg.layer_kinds())
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.cfg.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        # Projections back into the residual stream start small so depth does not blow it up (GPT-2).
        for name, child in module.named_children():
            if name == "out" and isinstance(child, nn.Linear):
                nn.init.normal_(child.weight, std=self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The parallel (training) pass: input_ids [B, L] -> (logits [B, L, vocab], loss).

        loss is next_token_loss(logits, targets) for targets [B, L] (usually input_ids shifted by
        one), else None.
        """
        x = self.embed(input_ids)
        for block in self.blocks:
            x, _ = block(x)
        logits = self.head(self.norm(x))
        return logits, (None if targets is None else next_token_loss(logits, targets))

    def init_state(self, batch_size: int) -> DecodeState:
        return DecodeState(0, [block.init_state(batch_size) for block in self.blocks])

    def prefill(self, input_ids: Tensor, state: DecodeState) -> tuple[Tensor, DecodeState]:
        """Parallel pass over a piece that continues from `state`: (logits [B, L, vocab], new state)."""
        x = self.embed(input_ids)
        layers = []
        for block, layer_state in zip(self.blocks, state.layers):
            x, layer_state = block(x, layer_state, state.position)
            layers.append(layer_state)
        return self.head(self.norm(x)), DecodeState(state.position + input_ids.shape[1], layers, state.constants)

    def step(self, token_ids: Tensor, state: DecodeState) -> tuple[Tensor, DecodeState]:
        """One token per sequence: token_ids [B] -> (logits [B, vocab], new state)."""
        constants = state.constants if state.constants is not None else [b.step_constants() for b in self.blocks]
        x = self.embed(token_ids)
        layers = []
        for block, layer_state, layer_constants in zip(self.blocks, state.layers, constants):
            x, layer_state = block.step(x, layer_state, state.position, layer_constants)
            layers.append(layer_state)
        return self.head(self.norm(x)), DecodeState(state.position + 1, layers, constants)

    @torch.no_grad()
    def stream(self, input_ids: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None
               ) -> Iterator[Tensor]:
        """Read the prompt in parallel, then decode recurrently, yielding each new token [B] as soon as it is
        drawn. temperature=0 is greedy decoding."""
        logits, state = self.prefill(input_ids, self.init_state(input_ids.shape[0]))
        logits = logits[:, -1]
        for i in range(max_new_tokens):
            next_token = sample(logits, temperature, top_k)
            yield next_token
            if i + 1 < max_new_tokens:
                logits, state = self.step(next_token, state)

    def generate(self, input_ids: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None
                 ) -> Tensor:
        """`stream`, collected after the prompt: [B, prompt + max_new_tokens]."""
        new = [token[:, None] for token in self.stream(input_ids, max_new_tokens, temperature, top_k)]
        return torch.cat([input_ids, *new], dim=1)


def next_token_loss(logits: Tensor, targets: Tensor, reduction: Literal["mean", "sum", "none"] = "mean") -> Tensor:
    """Cross-entropy of logits [B, L, vocab] against targets [B, L]; "none" gives [B, L].

    Computed in at least float32: under bf16 autocast the logits are bf16, too coarse for a loss.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=reduction)
    return loss.view(targets.shape) if reduction == "none" else loss


def sample(logits: Tensor, temperature: float = 1.0, top_k: int | None = None) -> Tensor:
    """Draw one token per row from logits [B, vocab]."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1)[:, 0]


def build_model(cfg: ModelConfig) -> LanguageModel:
    return LanguageModel(cfg)
