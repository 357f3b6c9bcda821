"""The registered model as MLflow stores it: a python_function model logged as code, its weights as tensors.

Why this format, not MLflow's pytorch flavour:
  * weights: a state dict of tensors read with `torch.load(weights_only=True)`, so loading a model executes
    no pickled object (the pytorch flavour's "pickle" format pickles the module, and warns about it);
  * code: this file and the `models` package travel with the model (`code_paths`), so it loads in any
    Python with torch and mlflow, where this repository is not installed;
  * not "pt2" (torch.export): an exported graph keeps `forward` only, and evaluation and decoding need
    `init_state`, `prefill` and `step`.

MLflow runs this file when it loads the model (`mlflow.models.set_model` below); `pipeline.train` logs it by
path and never imports it. Loaded: `mlflow.pyfunc.load_model(uri).unwrap_python_model().model` is the
`models.LanguageModel`; `predict` takes token ids [B][L] and gives the next token's log-probabilities [B][vocab].
"""

import json
from typing import Any

import mlflow
import torch

WEIGHTS, CONFIG = "weights", "model_config"  # the artifacts' names, as pipeline.train logs them


class RegisteredLanguageModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from models import ModelConfig, build_model

        with open(context.artifacts[CONFIG]) as f:
            self.model = build_model(ModelConfig(**json.load(f)))
        self.model.load_state_dict(torch.load(context.artifacts[WEIGHTS], map_location="cpu", weights_only=True))
        self.model.eval()

    def predict(self, model_input: list[list[int]], params: dict[str, Any] | None = None) -> list[list[float]]:
        """Token ids of B sequences of one length -> the next token's log-probabilities [B][vocab] (MLflow checks
        inputs against these type hints and derives the signature from them)."""
        ids = torch.as_tensor(model_input, dtype=torch.long)
        with torch.no_grad():
            logits, _ = self.model(ids)
        return torch.log_softmax(logits[:, -1].float(), dim=-1).tolist()


mlflow.models.set_model(RegisteredLanguageModel())
