"""`GSSForCausalLM`: the project's `LanguageModel` (model.py, copied from `models/` by `gss export`) behind the
Hugging Face model API.

A forward without a cache is the parallel (training) pass, so logits are the checkpoint's. `generate` decodes
recurrently, as `gss generate` does: the first forward reads the prompt with `prefill` and returns a
`RecurrentCache`; every later forward is one `step` on the new token, whatever the length so far.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_gss import GSSConfig
from .model import DecodeState, LanguageModel, next_token_loss


class RecurrentCache:
    """The model's DecodeState between forwards of `generate`. Not a transformers `Cache`: a recurrent state
    cannot be cropped or rolled back, so beam search and assisted decoding are not supported."""

    is_compileable = False
    is_croppable = False

    def __init__(self, state: DecodeState):
        self.state = state

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.state.position


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
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("GSS models read every token: padding is not supported, give sequences of one length")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is None and not use_cache:
            logits, _ = self.model(input_ids)
        else:
            state = cache.state if cache is not None else self.model.init_state(input_ids.shape[0])
            if cache is not None and input_ids.shape[1] == 1:
                logits, state = self.model.step(input_ids[:, 0], state)
                logits = logits[:, None]
            else:
                logits, state = self.model.prefill(input_ids, state)
            cache = RecurrentCache(state)
        loss = None if labels is None else next_token_loss(logits[:, :-1], labels[:, 1:])
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)
