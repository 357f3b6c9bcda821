"""GSS, DSS, Transformer and GSS-Hybrid language models.

Every block has the same entry points:
  forward(x, state=None, position=0, pad=None) -> (x, state)
      parallel over a piece of L tokens. Without a state it is the training pass; with one it continues from it
      (prompt prefill, long-context evaluation in pieces) and returns the state after the piece.
  static_state(state, position, capacity) -> buffers
      the state after a prefill, moved into buffers that recurrent decoding updates in place.
  step(x, buffers, position, pad, constants) -> x
      one token, for recurrent decoding: the buffers are updated in place, nothing is allocated that lives on,
      and `position` is a tensor, so one compiled (or CUDA-graph captured) step serves every token.
`position` is the absolute index of the first token in the batch. `pad` [B] (optional) is each row's left
padding: row b's prompt starts at position pad[b], and the model sees that row as if it started there (the
SSM's input is zeroed before it, attention never looks before it, RoPE and chunks count from it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .ssm import DiagonalSSM, StepConstants


def relative_positions(position: int | Tensor, length: int, pad: Tensor | None, device: torch.device) -> Tensor:
    """Each token's position counted from its row's start: [L] without padding, else [B, L] (negative on padding)."""
    positions = torch.arange(length, device=device) + position
    return positions if pad is None else positions - pad[:, None]


class SSMBlock(nn.Module):
    """A block around a DiagonalSSM `self.ssm`: `mix(x, run_ssm)` is the block, and the parallel
    pass and the recurrent step differ only in how the SSM is run."""

    ssm: DiagonalSSM

    def mix(self, x: Tensor, run_ssm: Callable[[Tensor], tuple[Tensor, Any]]) -> tuple[Tensor, Any]:
        raise NotImplementedError

    def forward(self, x: Tensor, state: Tensor | None = None, position: int = 0, pad: Tensor | None = None
                ) -> tuple[Tensor, Any]:
        def run_ssm(u: Tensor) -> tuple[Tensor, Any]:
            if pad is not None:
                started = relative_positions(position, x.shape[1], pad, x.device)[..., None] >= 0
                # zeroed, not multiplied: a padded position's u may be anything, and the state must stay exactly 0
                u = torch.where(started, u, 0)
            # The SSM runs on [B, H, L]; the transposes are views, carried out by copies that happen anyway
            # (the FFT's zero padding, the next matmul's input cast), or fused into them when compiled.
            y, new_state = self.ssm(u.mT, state)
            return y.mT, new_state

        return self.mix(x, run_ssm)

    def static_state(self, state: Tensor, position: int, capacity: int) -> Tensor:
        return state.clone()  # the decode's own buffer: the prefill's state stays as it was

    def step(self, x: Tensor, state: Tensor, position: Tensor, pad: Tensor, constants: StepConstants) -> Tensor:
        return self.mix(x, lambda u: (self.ssm.step(u, state, constants), state))[0]  # u [B, H]: no transposes

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
        self.widths = [cfg.d_gate, cfg.d_ssm]
        self.norm = nn.LayerNorm(cfg.d_model)
        self.to_gate_and_ssm = nn.Linear(cfg.d_model, cfg.d_gate + cfg.d_ssm)  # W_F and W_H: one matmul over h
        self.ssm_norm = nn.LayerNorm(cfg.d_ssm)  # the paper's dss() normalises its input
        self.ssm = DiagonalSSM(cfg.d_ssm, cfg.state_size, cfg.ssm_kernel, cfg.ssm_chunk, cfg.ssm_max_memory)
        self.ssm_out = nn.Linear(cfg.d_ssm, cfg.d_gate)
        self.out = nn.Linear(cfg.d_gate, cfg.d_model)
        self.register_load_state_dict_pre_hook(merge_input_projections)

    def mix(self, x: Tensor, run_ssm: Callable[[Tensor], tuple[Tensor, Any]]) -> tuple[Tensor, Any]:
        gate, ssm_in = self.to_gate_and_ssm(self.norm(x)).split(self.widths, dim=-1)
        # GELU after the split: compiled, each fuses into its consumer (the gating multiply, the SSM's LayerNorm)
        # instead of the whole [B, L, F + H] being written once more
        y, state = run_ssm(self.ssm_norm(F.gelu(ssm_in)))
        return x + self.out(self.ssm_out(y) * F.gelu(gate)), state


def merge_input_projections(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *_: Any) -> None:
    """Weights saved before GSS's W_F and W_H became one Linear (`to_gate`, `to_ssm`; commits up to da38185) load
    into `to_gate_and_ssm`, the two stacked: checkpoints, registered models and exports of older runs still load."""
    for name in ("weight", "bias"):
        gate, ssm = f"{prefix}to_gate.{name}", f"{prefix}to_ssm.{name}"
        if gate in state_dict and ssm in state_dict:
            state_dict[f"{prefix}to_gate_and_ssm.{name}"] = torch.cat([state_dict.pop(gate), state_dict.pop(ssm)])


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.up = nn.Linear(cfg.d_model, cfg.d_gate)
        self.out = nn.Linear(cfg.d_gate, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.out(F.gelu(self.up(self.norm(x))))


class DSSBlock(SSMBlock):
    """The DSS baseline the paper compares with: DSS over all E channels, with the DSS paper's step per channel and
    initial modes, then an MLP.

    x + GLU(W_o GELU(DSS(LayerNorm(x)))), followed by a pre-LN MLP of width F. The GLU after the SSM is the
    S4/DSS language-model block's (`postact: glu`); without it the block mixes tokens only through a fixed
    per-channel filter, and learns markedly slower (BENCHMARKS.md section 10).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.ssm = DiagonalSSM(cfg.d_model, cfg.state_size, cfg.ssm_kernel, cfg.ssm_chunk, cfg.ssm_max_memory,
                               learned_step=True)
        self.out = nn.Linear(cfg.d_model, 2 * cfg.d_model)  # value and gate halves of the GLU
        self.mlp = MLP(cfg)

    def mix(self, x: Tensor, run_ssm: Callable[[Tensor], tuple[Tensor, Any]]) -> tuple[Tensor, Any]:
        y, state = run_ssm(self.norm(x))
        value, gate = self.out(F.gelu(y)).chunk(2, dim=-1)
        # spelled out rather than F.glu: PyTorch/XLA has no lowering for glu's backward (it falls back to the host)
        return self.mlp(x + value * torch.sigmoid(gate)), state


def rotary(x: Tensor, positions: Tensor, base: float) -> Tensor:
    """RoPE on x [B, heads, L, d] at integer positions [L], or [B, L] per row (rotate-half form)."""
    half = x.shape[-1] // 2
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angle = positions.to(torch.float32)[..., None] * inv_freq
    if angle.dim() == 3:
        angle = angle[:, None]  # [B, 1, L, half]: the same angles for every head
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

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None, position: int = 0,
                pad: Tensor | None = None):  # fmt: skip
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm(x)).view(batch, length, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        positions = self._rope_positions(relative_positions(position, length, pad, x.device))
        q, k = rotary(q, positions, self.rope_base), rotary(k, positions, self.rope_base)
        if state is None:
            y = self._attend_fresh(q, k, v, position, pad)
        else:
            y, state = self._attend_cached(q, k, v, state, position, pad)
        y = y.transpose(1, 2).reshape(batch, length, width)
        return self.mlp(x + self.out(y)), state

    def _attend_fresh(self, q: Tensor, k: Tensor, v: Tensor, position: int, pad: Tensor | None) -> Tensor:
        """Training pass from position 0: causal attention, per chunk for local attention."""
        if position != 0 or pad is not None:
            raise ValueError("a stateless attention pass starts at position 0, unpadded; pass a state to continue")
        length = q.shape[2]
        chunk = self.chunk or length
        if length <= chunk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        # Pad the end to whole chunks (causal, so padding never reaches real tokens), fold the
        # chunks into the batch, attend inside each, and unfold.
        pad_end = -length % chunk
        b, h, _, d = q.shape
        folded = [F.pad(t, (0, 0, 0, pad_end)).reshape(b, h, -1, chunk, d).transpose(1, 2).reshape(-1, h, chunk, d)
                  for t in (q, k, v)]  # fmt: skip
        y = F.scaled_dot_product_attention(*folded, is_causal=True)
        return y.reshape(b, -1, h, chunk, d).transpose(1, 2).reshape(b, h, -1, d)[:, :, :length]

    def _attend_cached(self, q: Tensor, k: Tensor, v: Tensor, cache: tuple[Tensor, Tensor], position: int,
                       pad: Tensor | None):  # fmt: skip
        """Continue after `cache`: keys are the cached ones followed by this piece's."""
        k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        end = position + q.shape[2]
        query = relative_positions(position, q.shape[2], pad, q.device)[..., :, None]
        key = relative_positions(end - k.shape[2], k.shape[2], pad, q.device)[..., None, :]
        mask = (key <= query) & (key >= 0)
        if self.chunk is not None:
            mask &= key // self.chunk == query // self.chunk
        mask |= key == query  # a padded query sees itself: no row of the mask is empty (softmax would give NaN)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask if pad is None else mask[:, None])
        # local attention keeps the last chunk - 1 tokens: the open chunk of every row, wherever its prompt began
        keep = k.shape[2] if self.chunk is None else min(k.shape[2], self.chunk - 1)
        return y, (k[:, :, k.shape[2] - keep :], v[:, :, v.shape[2] - keep :])

    def static_state(self, cache: tuple[Tensor, Tensor], position: int, capacity: int) -> tuple[Tensor, Tensor]:
        """The cache as fixed buffers of `slots` tokens: a ring of one chunk for local attention, else `capacity`
        slots (every position the decode will reach). The token at position p lives in slot p % slots."""
        batch, heads, cached, head_dim = cache[0].shape
        slots = self.chunk or capacity
        if position > slots and self.chunk is None:
            raise ValueError(f"capacity={capacity}: the decode already holds {position} tokens")
        index = torch.arange(position - cached, position, device=cache[0].device) % slots
        return tuple(c.new_zeros(batch, heads, slots, head_dim).index_copy_(2, index, c) for c in cache)

    def step(self, x: Tensor, cache: tuple[Tensor, Tensor], position: Tensor, pad: Tensor, constants: None = None
             ) -> Tensor:  # fmt: skip
        """One token per row: its key and value go into slot position % slots, and it attends to the slots
        holding tokens of its own row (and chunk) at most as old as itself."""
        batch, width = x.shape
        q, k, v = self.qkv(self.norm(x)).view(batch, 3, self.n_heads, 1, -1).unbind(1)
        relative = position - pad  # [B]
        rope = self._rope_positions(relative)[:, None]
        q, k = rotary(q, rope, self.rope_base), rotary(k, rope, self.rope_base)
        keys, values = cache
        slots = keys.shape[2]
        slot = (position % slots).view(1)
        keys.index_copy_(2, slot, k)
        values.index_copy_(2, slot, v)
        age = (position - torch.arange(slots, device=x.device)) % slots  # tokens back from this one, per slot
        reach = relative if self.chunk is None else relative % self.chunk  # [B]: how far back this row may look
        mask = age <= reach[:, None]  # [B, slots]
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None, None, :])
        return self.mlp(x + self.out(y.reshape(batch, width)))

    def step_constants(self) -> None:
        return None  # nothing to precompute: the cache is the state

    def init_state(self, batch_size: int) -> tuple[Tensor, Tensor]:
        head_dim = self.qkv.in_features // self.n_heads
        empty = self.qkv.weight.new_zeros(batch_size, self.n_heads, 0, head_dim)
        return empty, empty


@dataclass
class DecodeState:
    """Where a parallel pass over pieces stands (`prefill`): the next token's position, each layer's state, the
    batch size and each row's left padding ([B], or None without padding). An attention cache grows with it."""

    position: int
    layers: list[Any]
    batch_size: int
    pad: Tensor | None = None


@dataclass
class StepState:
    """Recurrent decoding's state, in buffers allocated once per decode and updated in place by
    `LanguageModel.step`: every tensor keeps its storage from the first token to the last.

    position: the next token's position, a 0-d long tensor (a compiled step sees the same graph at every token);
    pad: each row's left padding [B]; layers: each block's buffers (an SSM's state [2, B, H, N] in float32, an
    attention block's key and value slots [B, heads, slots, d]); constants: each block's step constants, made
    once for the decode. It belongs to the weights it started with.
    """

    position: Tensor
    pad: Tensor
    layers: list[Any]
    constants: list[Any]

    def tensors(self) -> list[Tensor]:
        """Every buffer a step writes, for snapshots and graph capture."""
        flat = [self.position]
        for layer in self.layers:
            flat.extend(layer if isinstance(layer, tuple) else (layer,))
        return flat


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

    def forward(self, input_ids: Tensor, targets: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
        """The parallel (training) pass over input_ids [B, L].

        Without targets: (logits [B, L, vocab], None). With targets [B, L] (usually input_ids shifted by one):
        (None, loss), loss the mean next-token cross-entropy, next_token_loss(logits, targets), computed by
        `chunked_next_token_loss` a chunk of rows at a time so that the [B, L, vocab] logits never exist.
        """
        x = self.embed(input_ids)
        for block in self.blocks:
            x, _ = block(x)
        if targets is not None:
            # the head's weight, not the head: its matmul happens inside the chunked loss (tied: the embedding's)
            return None, chunked_next_token_loss(self.norm(x), self.head.weight, targets)
        return self.head(self.norm(x)), None

    def init_state(self, batch_size: int, pad: Tensor | None = None) -> DecodeState:
        """The state before the first token; `pad` [B]: each row's left padding (see the module's docstring)."""
        if pad is not None and pad.shape != (batch_size,):
            raise ValueError(f"pad has shape {tuple(pad.shape)}: give one left-padding length per row ({batch_size})")
        return DecodeState(0, [block.init_state(batch_size) for block in self.blocks], batch_size, pad)

    def prefill(self, input_ids: Tensor, state: DecodeState) -> tuple[Tensor, DecodeState]:
        """Parallel pass over a piece that continues from `state`: (logits [B, L, vocab], new state)."""
        x = self.embed(input_ids)
        layers = []
        for block, layer_state in zip(self.blocks, state.layers):
            x, layer_state = block(x, layer_state, state.position, state.pad)
            layers.append(layer_state)
        return self.head(self.norm(x)), replace(state, position=state.position + input_ids.shape[1], layers=layers)

    def start_decoding(self, state: DecodeState, capacity: int) -> StepState:
        """Move a prefill's state into the buffers `step` updates in place. capacity: the most tokens the decode
        will hold, prompt included (a Transformer's key and value slots; other blocks need no more than they have).
        """
        position = torch.tensor(state.position, device=self.embed.weight.device)
        pad = state.pad if state.pad is not None else position.new_zeros(state.batch_size)
        layers = [block.static_state(layer, state.position, capacity)
                  for block, layer in zip(self.blocks, state.layers)]  # fmt: skip
        return StepState(position, pad, layers, [block.step_constants() for block in self.blocks])

    def with_capacity(self, state: StepState, capacity: int) -> StepState:
        """`state` with room for `capacity` tokens: full attention's key and value slots copied into larger ones;
        every other buffer is kept as it is."""
        position = int(state.position)
        layers = [block.static_state(tuple(t[:, :, :position] for t in layer), position, capacity)
                  if isinstance(block, AttentionBlock) and block.chunk is None else layer
                  for block, layer in zip(self.blocks, state.layers)]  # fmt: skip
        return replace(state, layers=layers)

    def step(self, token_ids: Tensor, state: StepState) -> Tensor:
        """One token per sequence: token_ids [B] -> logits [B, vocab]; `state` moves on by one token, in place."""
        x = self.embed(token_ids)
        for block, layer_state, layer_constants in zip(self.blocks, state.layers, state.constants):
            x = block.step(x, layer_state, state.position, state.pad, layer_constants)
        state.position.add_(1)
        return self.head(self.norm(x))

    def stream(self, input_ids: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
               attention_mask: Tensor | None = None, fast: bool = True) -> Iterator[Tensor]:
        """Read the prompt in parallel, then decode recurrently, yielding each new token [B] as soon as it is
        drawn. temperature=0 is greedy decoding. attention_mask [B, L]: 0 on each row's left padding, 1 on its
        prompt (prompts of different lengths in one batch). fast=False runs the eager step (the reference)."""
        from .decoding import stream

        return stream(self, input_ids, max_new_tokens, temperature, top_k, attention_mask, fast)

    def generate(self, input_ids: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 attention_mask: Tensor | None = None, fast: bool = True) -> Tensor:
        """`stream`, collected after the prompt: [B, prompt + max_new_tokens]."""
        new = [token[:, None] for token in
               self.stream(input_ids, max_new_tokens, temperature, top_k, attention_mask, fast)]  # fmt: skip
        return torch.cat([input_ids, *new], dim=1)


def next_token_loss(logits: Tensor, targets: Tensor, reduction: Literal["mean", "sum", "none"] = "mean") -> Tensor:
    """Cross-entropy of logits [B, L, vocab] against targets [B, L]; "none" gives [B, L].

    Computed in at least float32: under bf16 autocast the logits are bf16, too coarse for a loss.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=reduction)
    return loss.view(targets.shape) if reduction == "none" else loss


# The chunked loss's logits are made this many elements at a time: 2**25 is 128 MB in float32, 1024 rows at a 32k
# vocab. That is the size of the hidden state [B·L, E] at paper width and batch (8 × 4096 × 1024), so the loss adds
# about one activation at its peak, and a chunk of ~1000 rows keeps its three matmuls large enough to run at speed
# (and a compiled or XLA graph, which unrolls the chunks, short: 32 chunks at 8 × 4096).
LOSS_CHUNK_ELEMENTS = 2**25
IGNORE_INDEX = -100  # F.cross_entropy's default, which next_token_loss keeps


def chunked_next_token_loss(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """next_token_loss(F.linear(hidden, weight), targets) without the logits: hidden [B, L, E], weight [vocab, E],
    targets [B, L] (-100: ignored), the mean cross-entropy, in at least float32.

    The logits are made LOSS_CHUNK_ELEMENTS // vocab rows at a time and dropped. When a
    gradient is needed, each chunk's gradient is computed in the same pass (`_LinearCrossEntropy`); under
    torch.no_grad it is not.
    """
    hidden, targets = hidden.flatten(0, 1), targets.flatten()
    rows = max(1, LOSS_CHUNK_ELEMENTS // weight.shape[0])
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, rows)
    return _linear_cross_entropy(hidden, weight, targets, rows, with_grads=False)[0]


class _LinearCrossEntropy(torch.autograd.Function):
    """The loss and, in the same forward, its gradients with respect to hidden and weight: the backward only scales
    them by the loss's gradient. Three matmuls per chunk, as a forward and backward through the head, no recompute,
    and nothing of the size of the logits is kept for the backward."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, targets: Tensor, rows: int) -> Tensor:
        loss, grad_hidden, grad_weight = _linear_cross_entropy(hidden, weight, targets, rows, with_grads=True)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor, Tensor, None, None]:
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None


def _linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, rows: int, with_grads: bool
                          ) -> tuple[Tensor, Tensor | None, Tensor | None]:  # fmt: skip
    """(mean loss, d loss / d hidden, d loss / d weight) for hidden [N, E], weight [vocab, E], targets [N], `rows`
    rows at a time: a static Python loop over static slices (torch.compile and XLA unroll it). The gradients are
    None without `with_grads`."""
    # The loss in at least float32, as next_token_loss; the matmuls in whatever dtype autocast (or the weights) gives.
    exact = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
    valid = targets != IGNORE_INDEX
    share = valid.to(exact) / valid.sum()  # each row's weight in the mean: a tensor, no .item() (no sync, no break)
    picks = targets.clamp(min=0)[:, None]  # an ignored row picks class 0, then weighs 0
    loss = hidden.new_zeros((), dtype=exact)
    grad_hidden = torch.empty_like(hidden) if with_grads else None
    grad_weight = None  # the first chunk's product (no zeros to add to), then each chunk's added; float32 at least
    for start in range(0, hidden.shape[0], rows):
        h, pick, row_share = hidden[start : start + rows], picks[start : start + rows], share[start : start + rows]
        logits = F.linear(h, weight)  # under bf16 autocast in bf16, as the head's nn.Linear
        z = logits.to(exact)  # logits itself when they are already in `exact`
        picked = z.gather(1, pick)[:, 0]
        top = z.amax(-1, keepdim=True)
        # exp(z - max) in place and its row sums: the log-sum-exp and the softmax in one [rows, vocab] tensor
        exps = z.sub_(top).exp_()
        sums = exps.sum(-1, keepdim=True)
        loss = loss + ((top[:, 0] + sums[:, 0].log() - picked) * row_share).sum()
        if grad_hidden is None:  # no gradient wanted
            continue
        # d loss / d logits = (softmax - one-hot) * the row's share, in place. Eager, the one-hot is a scatter, one
        # element per row; compiled, a comparison, which Inductor fuses into the chunk's one pointwise pass (a scatter
        # would stay an eager op after it, and the pass would write the whole chunk twice).
        probs = exps.mul_(row_share[:, None] / sums)
        if torch.compiler.is_compiling():
            one_hot = torch.arange(probs.shape[1], device=probs.device) == pick
            probs = torch.where(one_hot, probs - row_share[:, None], probs)
        else:
            probs = probs.scatter_add_(1, pick, -row_share[:, None])
        grad_logits = probs.to(logits.dtype)
        grad_hidden[start : start + rows] = grad_logits @ weight
        if grad_weight is None:
            grad_weight = (grad_logits.mT @ h).to(torch.promote_types(weight.dtype, torch.float32))
        elif grad_weight.dtype == grad_logits.dtype:
            grad_weight.addmm_(grad_logits.mT, h)  # in place: no [vocab, E] temporary per chunk
        else:
            grad_weight += grad_logits.mT @ h  # autocast's bf16 product, summed over the chunks in float32
    return loss, grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype)


def sample(logits: Tensor, temperature: float = 1.0, top_k: int | None = None) -> Tensor:
    """Draw one token per row from logits [B, vocab], without waiting on the device: an exponential race
    (argmax of p / Exp(1), which picks i with probability p_i) instead of torch.multinomial, which syncs."""
    logits = logits.float()  # bf16 logits too: a CPU's argmax is 5x slower over bf16
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return (probs / torch.empty_like(probs).exponential_(1)).argmax(-1)


def build_model(cfg: ModelConfig) -> LanguageModel:
    return LanguageModel(cfg)
