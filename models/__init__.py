"""GSS-family language models in pure PyTorch: no device, parallelism or logging code."""

from .config import ARCHS, PRESETS, ModelConfig
from .model import DecodeState, LanguageModel, StepState, build_model, next_token_loss, sample
from .ssm import DiagonalSSM

__all__ = [
    "ARCHS", "PRESETS", "DecodeState", "DiagonalSSM", "LanguageModel", "ModelConfig", "StepState", "build_model",
    "next_token_loss", "sample",
]  # fmt: skip
