"""`GSSForCausalLM`: the project's `LanguageModel` (model.py, copied from `models/` by `gss export`) behind the
Hugging Face model API.

A forward without a cache is the parallel (training) pass, so logits are the checkpoint's. `generate` decodes
recurrently, as `gss generate` does: the first forward reads the prompt with `prefill` and returns a
`RecurrentCache`; every later forward is one compiled step on the new token, whatever the length so far.
Prompts of different lengths batch with left padding (`attention_mask` 0 on the left): each row is read from where
its prompt starts, so it gets the logits and tokens it gets alone.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_gss import GSSConfig
from .decoding import Step, decoding_step, left_padding
from .model import DecodeState, LanguageModel, StepState, next_token_loss


class RecurrentCache:
    """The model's decoding state between forwards of `generate`: the prefill's DecodeState, then from the first
    step the StepState that the fast step (`models.decoding`) updates in place. Not a transformers `Cache`: a
    recurrent state cannot be cropped or rolled back, so beam search and assisted decoding are not supported.
    `generate` does not say how long it will go on, so a Transformer's key and value slots double when full."""

    is_compileable = False
    is_croppable = False

    def __init__(self, prefilled: DecodeState):
        self.prefilled, self.length, self.capacity = prefilled, prefilled.position, prefilled.position
        self.decoding: StepState | None = None
        self.run: Step | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def step(self, model: LanguageModel, token_ids: Tensor) -> Tensor:
        """token_ids [B] -> logits [B, vocab], the state one token on."""
        if self.length == self.capacity:  # the first step, or the slots are full
            self.capacity = 2 * self.length + 64
            self.decoding = (model.start_decoding(self.prefilled, self.capacity) if self.decoding is None
                             else model.with_capacity(self.decoding, self.capacity))  # fmt: skip
            # transformers draws the next token from the logits itself: the step's own (greedy) draw goes unused
            self.run = decoding_step(model, self.decoding, temperature=0, top_k=None)
        logits, _ = self.run(token_ids)
        self.length += 1
        return logits.clone()  # on CUDA the graph's output buffer, which the next step overwrites


class GSSForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = GSSConfig
    base_model_prefix = "model"
    _tied_weights_keys = {"model.head.weight": "model.embed.weight"}  # when config.tie_word_embeddings

    def __init__(self, config: GSSConfig):
        super().__init__(config)
        self.model = LanguageModel(config.model_config())
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        pass  # LanguageModel initialises itself; from_pretrained then loads every weight

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # no DynamicCache: forward makes its own RecurrentCache

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.head

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, cache: RecurrentCache | None = None,
                use_cache: bool | None = None, labels: Tensor | None = None, **kwargs) -> CausalLMOutputWithPast:
        """input_ids [B, L] -> logits [B, L, vocab]; labels (HF style: input_ids, shifted here, -100 ignored) give
        the loss."""
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is not None and input_ids.shape[1] == 1:  # a step: the prompt's padding is in the state already
            logits = cache.step(self.model, input_ids[:, 0])[:, None]
        else:
            if cache is not None and cache.decoding is not None:
                raise ValueError("this cache has begun decoding: continue it one token at a time")
            pad = left_padding(attention_mask, input_ids)
            if cache is None and not use_cache and pad is None:
                logits, _ = self.model(input_ids)
            else:  # each row read from where its prompt starts (left padding), the state kept for decoding
                state = cache.prefilled if cache is not None else self.model.init_state(input_ids.shape[0], pad)
                logits, state = self.model.prefill(input_ids, state)
                cache = RecurrentCache(state)
        loss = None if labels is None else next_token_loss(logits[:, :-1], labels[:, 1:])
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)
