"""The Hugging Face config of an exported GSS model: `gss` holds the `ModelConfig` it was trained with.

Written by `gss export` beside config.py, model.py and ssm.py, which it copies from the project's `models/`.
"""

from transformers import PreTrainedConfig

from .config import ModelConfig


class GSSConfig(PreTrainedConfig):
    model_type = "gss"

    gss: dict | None = None
    """`models.ModelConfig`'s fields."""
    vocab_size: int = 0
    tie_word_embeddings: bool = True
    use_cache: bool = False
    """Off: a plain forward is the parallel pass, the checkpoint's own logits; `generate` turns it on."""

    def model_config(self) -> ModelConfig:
        return ModelConfig(**(self.gss or {}))
