"""Recurrent decoding at memory speed: the prompt read in parallel, then one compiled step per token.

`LanguageModel.step` is the eager reference: it updates a `StepState` (buffers allocated once per decode) in place
and allocates nothing that lives on. The fast path runs the same function:
  * compiled by Inductor (default mode, one graph), so the state's complex arithmetic becomes a few fused
    passes instead of dozens of small kernels. The position is a tensor in the state, so one compiled graph
    serves every token.
  * on CUDA, that compiled step and the draw of the next token captured in a CUDA graph once per decode and
    replayed per token (one launch instead of hundreds), with the state's buffers, the input token and the
    outputs at fixed addresses. Not `mode="reduce-overhead"`: it refuses graphs that mutate their inputs, and
    adds guard checks per call.
Sampling never waits on the device (`sample` draws by an exponential race), so a decode queues its tokens
without a host round trip; only the caller's reading of a token waits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from .model import LanguageModel, StepState, sample
from .ssm import DiagonalSSM

# (token_ids [B]) -> (logits [B, vocab], next tokens [B]); the state it moves on is bound in.
Step = Callable[[Tensor], tuple[Tensor, Tensor]]

# Compiled once per model shape and dtype; the batch size becomes dynamic at the second one seen (Dynamo's
# automatic dynamic shapes), and so does a Transformer's cache length. Not fullgraph=True: the step has no graph
# break (tested), but a process that meets more model shapes than Dynamo's recompile limit (8) should go on
# eagerly, with Dynamo's warning, not fail.
compiled_model_step = torch.compile(LanguageModel.step)


def decoding_step(model: LanguageModel, state: StepState, temperature: float, top_k: int | None,
                  fast: bool = True) -> Step:  # fmt: skip
    """One step on `state` and the draw of the next tokens. fast: the model's step compiled, and on CUDA the
    whole (step and draw) captured in a CUDA graph; else eager, the reference. The draw stays out of the
    compiled graph, so a new temperature or top_k never compiles again."""
    run = compiled_model_step if fast else LanguageModel.step

    def step(token_ids: Tensor) -> tuple[Tensor, Tensor]:
        logits = run(model, token_ids, state)
        return logits, sample(logits, temperature, top_k)

    return graphed(step, state) if fast and state.position.is_cuda else step


def graphed(step: Step, state: StepState) -> Step:
    """`step` captured in a CUDA graph (Mamba's `capture_graph`): warmed up on a side stream, captured once, the
    state put back as it was before the warm-up; each call copies the token into the graph's input and replays.
    The outputs are the graph's own buffers, overwritten by the next call: copy what must outlive it."""
    token = state.pad.new_zeros(state.pad.shape)
    before = [t.clone() for t in state.tensors()]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # compile, and let the allocator settle, outside the capture
            step(token)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step(token)
    for t, saved in zip(state.tensors(), before):
        t.copy_(saved)  # the warm-up's steps never happened

    def replay(token_ids: Tensor) -> tuple[Tensor, Tensor]:
        token.copy_(token_ids)
        graph.replay()
        return outputs

    return replay


def left_padding(attention_mask: Tensor | None, input_ids: Tensor) -> Tensor | None:
    """attention_mask [B, L], 0 on each row's left padding and 1 on its prompt -> pad [B] (None if no row has
    padding); anything else is refused with the reason."""
    if attention_mask is None:
        return None
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                         f"{tuple(input_ids.shape)}: give one 0 or 1 per token")  # fmt: skip
    mask = attention_mask.to(torch.bool)
    pad = (~mask).sum(1)
    length = input_ids.shape[1]
    if not torch.equal(mask, torch.arange(length, device=mask.device) >= pad[:, None]):
        raise ValueError("attention_mask must be left padding: each row 0s, then 1s to its end (pad prompts on the "
                         "left; a causal model's last token must be the prompt's)")  # fmt: skip
    if bool((pad == length).any()):
        raise ValueError("a row of attention_mask is all 0s: every prompt needs at least one token")
    return pad if bool(pad.any()) else None


def stream(model: LanguageModel, input_ids: Tensor, max_new_tokens: int, temperature: float = 1.0,
           top_k: int | None = None, attention_mask: Tensor | None = None, fast: bool = True) -> Iterator[Tensor]:
    """`LanguageModel.stream`: the arguments checked now, then a generator of the new tokens [B]."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be at least 0")
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: must be at least 0 (0 is greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k}: must be at least 1 (or None: no limit)")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}: give [batch, prompt length >= 1]")
    pad = left_padding(attention_mask, input_ids)
    return _decode(model, input_ids, pad, max_new_tokens, temperature, top_k, fast)


@torch.no_grad()
def _decode(model: LanguageModel, input_ids: Tensor, pad: Tensor | None, max_new_tokens: int, temperature: float,
            top_k: int | None, fast: bool) -> Iterator[Tensor]:  # fmt: skip
    """Prefill, then `max_new_tokens - 1` steps, fast or eager."""
    if max_new_tokens == 0:
        return
    logits, prefilled = model.prefill(input_ids, model.init_state(input_ids.shape[0], pad))
    token = sample(logits[:, -1], temperature, top_k)
    yield token
    if max_new_tokens == 1:
        return  # no step to run: nothing to allocate, compile or capture
    state = model.start_decoding(prefilled, capacity=input_ids.shape[1] + max_new_tokens)
    step = decoding_step(model, state, temperature, top_k, fast)
    for _ in range(max_new_tokens - 1):
        _, token = step(token)
        yield token.clone()  # a graph's output buffer is overwritten by the next step


def cast_for_decoding(model: LanguageModel, dtype: torch.dtype) -> LanguageModel:
    """Every weight but the SSMs' in `dtype` (bf16 on a GPU), in place: a decode then casts nothing per step,
    where autocast would cast every weight at every token. The SSMs keep theirs, and compute in float32."""
    for module in model.modules():
        if not isinstance(module, DiagonalSSM):
            for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
                tensor.data = tensor.data.to(dtype)
    return model
