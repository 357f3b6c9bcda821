"""The registered model as MLflow stores it: a python_function model logged as code, its weights as tensors.

Why this format, not MLflow's pytorch flavour:
  * weights: a state dict of tensors read with `torch.load(weights_only=True)`, so loading a model executes
    no pickled object (the pytorch flavour's "pickle" format pickles the module, and warns about it);
  * code: this file, the `models` package and `pipeline/tokenizer.py` travel with the model (`code_paths`), so it
    loads in any Python with torch, mlflow and sentencepiece, where this repository is not installed;
  * not "pt2" (torch.export): an exported graph keeps `forward` only, and evaluation and decoding need
    `init_state`, `prefill` and `step`.

MLflow runs this file when it loads the model (`mlflow.models.set_model` below); `pipeline.train` logs it by
path and never imports it. Loaded: `mlflow.pyfunc.load_model(uri).unwrap_python_model().model` is the
`models.LanguageModel`. `predict` takes either of
  * text prompts ["...", ...] -> the text each one generates, as `gss generate` gives it: the prompt is
    `[</s>] + its tokens`, the answer the decoded whole minus the prompt's text. The params `max_new_tokens`,
    `temperature` (0: greedy) and `top_k` take their defaults from the signature (`pipeline.train` logs
    `gss generate`'s). Prompts of different lengths are decoded in one batch, left-padded;
  * token ids [B][L] of one length -> the next token's log-probabilities [B][vocab].
`predict_stream` takes one text prompt and yields its new text piece by piece.
"""

import json
import threading
from collections.abc import Iterator
from typing import Any

import mlflow
import torch
from mlflow.exceptions import MlflowException

WEIGHTS, CONFIG, TOKENIZER = "weights", "model_config", "tokenizer"  # the artifacts' names, as pipeline.train logs them
SAMPLING_PARAMS = ("max_new_tokens", "temperature", "top_k")


class RegisteredLanguageModel(mlflow.pyfunc.PythonModel):
    # Bounds on one request, so that no request can hold the server for long or exhaust its memory (a
    # Transformer's cache holds prompt + new tokens).
    MAX_PROMPT_TOKENS = 8192
    MAX_NEW_TOKENS = 8192

    def load_context(self, context) -> None:
        from models import ModelConfig, build_model

        try:
            from pipeline.tokenizer import Tokenizer  # where this repository is installed (as when training logs it)
        except ImportError:
            from tokenizer import Tokenizer  # pipeline/tokenizer.py, travelling in code_paths

        with open(context.artifacts[CONFIG]) as f:
            self.model = build_model(ModelConfig(**json.load(f)))
        self.model.load_state_dict(torch.load(context.artifacts[WEIGHTS], map_location="cpu", weights_only=True))
        self.model.eval()
        with open(context.artifacts[TOKENIZER], "rb") as f:
            self.tokenizer = Tokenizer(f.read())
        # The scoring server predicts on threads: one decode at a time (decodes side by side would only split the
        # cores, and would compile the decoding step side by side).
        self.decoding = threading.Lock()

    def predict(self, model_input: list[str | list[int]],
                params: dict[str, Any] | None = None) -> list[str | list[float]]:  # fmt: skip
        """Text prompts -> their generated texts, or token ids -> the next token's log-probabilities (see the module
        docstring). MLflow checks inputs against these type hints and derives the signature from them."""
        if not model_input:
            return []
        if all(isinstance(row, list) for row in model_input):
            ids = torch.as_tensor(model_input, dtype=torch.long)
            with torch.no_grad():
                logits, _ = self.model(ids)
            return torch.log_softmax(logits[:, -1].float(), dim=-1).tolist()
        prompts = self._encode(model_input)
        max_new_tokens, temperature, top_k = self._sampling(params)
        longest = max(len(p) for p in prompts)
        padding = [longest - len(p) for p in prompts]
        ids = torch.tensor([[self.tokenizer.eod_id] * pad + p for pad, p in zip(padding, prompts)])
        mask = torch.tensor([[0] * pad + [1] * len(p) for pad, p in zip(padding, prompts)])
        with self.decoding:
            new = self.model.generate(ids, max_new_tokens, temperature, top_k, attention_mask=mask)[:, longest:]
        return [self.tokenizer.decode(p + row)[len(self.tokenizer.decode(p)):] for p, row in zip(prompts, new.tolist())]

    def predict_stream(self, model_input: str, params: dict[str, Any] | None = None) -> Iterator[str]:
        """One text prompt -> its generated text, piece by piece as the tokens come (MLflow gives predict_stream
        one input)."""
        (tokens,) = self._encode([model_input])
        max_new_tokens, temperature, top_k = self._sampling(params)
        shown = self.tokenizer.decode(tokens)
        with self.decoding:
            for token in self.model.stream(torch.tensor([tokens]), max_new_tokens, temperature, top_k):
                tokens.append(int(token[0]))
                text = self.tokenizer.decode(tokens)  # the whole text: a piece's leading space survives only mid-text
                if piece := text[len(shown):]:
                    yield piece
                shown = text

    def _encode(self, prompts: list[Any]) -> list[list[int]]:
        """Each prompt as `gss generate` reads it, after </s>; anything but a non-empty text within
        MAX_PROMPT_TOKENS is refused (a 400 from the scoring server)."""
        encoded = []
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise MlflowException.invalid_parameter_value(
                    f"input {i} is {prompt!r}: give text prompts (strings) only, or lists of token ids only")
            if not prompt:
                raise MlflowException.invalid_parameter_value(f"prompt {i} is empty: give at least one character")
            tokens = self.tokenizer.sp.encode(prompt)
            if len(tokens) > self.MAX_PROMPT_TOKENS:
                raise MlflowException.invalid_parameter_value(
                    f"prompt {i} is {len(tokens)} tokens long: at most {self.MAX_PROMPT_TOKENS} are read")
            encoded.append([self.tokenizer.eod_id] + tokens)  # a document starts after </s>
        return encoded

    def _sampling(self, params: dict[str, Any] | None) -> tuple[int, float, int]:
        """max_new_tokens, temperature, top_k, checked. MLflow's pyfunc fills in the ones a request leaves out from
        the signature's defaults and checks their types (a call of the unwrapped model gives all three); the ranges
        are checked here."""
        params = params or {}
        if missing := [name for name in SAMPLING_PARAMS if name not in params]:
            raise MlflowException.invalid_parameter_value(f"params lack {', '.join(missing)}")
        max_new_tokens, temperature, top_k = (params[name] for name in SAMPLING_PARAMS)
        if not 0 <= max_new_tokens <= self.MAX_NEW_TOKENS:
            raise MlflowException.invalid_parameter_value(
                f"max_new_tokens={max_new_tokens}: give 0 to {self.MAX_NEW_TOKENS}")
        if temperature < 0:
            raise MlflowException.invalid_parameter_value(f"temperature={temperature}: give 0 (greedy) or more")
        if top_k < 1:
            raise MlflowException.invalid_parameter_value(f"top_k={top_k}: give 1 or more")
        return max_new_tokens, temperature, top_k


mlflow.models.set_model(RegisteredLanguageModel())
