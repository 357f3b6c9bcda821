"""`gss export MODEL_URI OUT_DIR`: a Hugging Face model folder that `transformers` loads with trust_remote_code,
in any Python with torch, transformers and sentencepiece (this project need not be installed).

The folder: config.json (with auto_map), model.safetensors, tokenizer.model with tokenizer_config.json,
generation_config.json, a README model card from what MLflow knows, and the modeling code: `models/*.py` as
they are, beside the thin wrappers of `pipeline/hf/` (configuration_gss.py, modeling_gss.py,
tokenization_gss.py), copied, never rewritten. It is written to a temporary folder beside OUT_DIR and renamed
into place, so OUT_DIR is either the whole export or not there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

from pipeline.config import RunConfig
from pipeline.tracking import Tag, Tracking, finished_evals, run_tagged

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE_DIRS = (os.path.join(PROJECT, "models"), os.path.join(PROJECT, "pipeline", "hf"))
CARD_METRICS = ("token_ppl", "word_ppl", "bits_per_byte")
AUTO_MAP = {"AutoConfig": "configuration_gss.GSSConfig", "AutoModelForCausalLM": "modeling_gss.GSSForCausalLM"}


class ExportError(Exception):
    """A reason to export nothing, said in one line."""


def export(cfg: RunConfig, model_uri: str, out: str, force: bool = False, sampling: dict[str, Any] | None = None
           ) -> str:
    """Write the folder `out` for `model_uri` (models:/name/version, models:/name@alias, or a checkpoint folder);
    `sampling`: generation_config.json's sampling defaults. Returns `out`."""
    import importlib.util

    from pipeline.dataset import dataset_dir
    from pipeline.evaluate import load_model
    from pipeline.storage import disk_full, is_full_disk

    if importlib.util.find_spec("safetensors") is None:
        raise ExportError("needs the hf extra: pip install -e '.[hf]' (transformers, safetensors)")
    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not force:
        raise ExportError(f"{out} exists and is not an empty folder; give --force to replace it")
    tracking = Tracking.of(cfg)  # where registered models and their runs are
    loaded = load_model(model_uri, tracking)  # EvalError: not a registered model, not a checkpoint
    dataset = loaded.dataset or dataset_dir(cfg)  # a checkpoint's tokenizer: the config's dataset, as for gss eval
    tokenizer = _tokenizer_bytes(dataset, loaded)

    # before: a full disk below is OUT_DIR's, not the MLflow store's
    facts = _card_facts(loaded, dataset, tracking.client)
    parent = os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=parent)  # same filesystem: rename is atomic
        try:
            _write(tmp, loaded, tokenizer, facts, sampling or {})
            _readable_as_umask_says(tmp)
            if os.path.exists(out):
                old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old.", dir=parent)
                os.replace(out, os.path.join(old, "replaced"))
                os.replace(tmp, out)
                shutil.rmtree(old)
            else:
                os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except Exception as e:
        if not is_full_disk(e):  # safetensors says it in its own SafetensorError, open() as ENOSPC
            raise
        # said once the temporary folder is gone: the space it took is free again
        raise ExportError(f"{out}: {disk_full(out, 'give an OUT_DIR on a bigger disk')}. Nothing was written: run "
                          "the same command again once there is room") from None
    print(f"exported {loaded.uri} to {out}")
    return out


def _readable_as_umask_says(folder: str) -> None:
    """mkdtemp's folder and safetensors' file are private to their owner; an export is made to be shared."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o666 & ~mask)


def _tokenizer_bytes(dataset: str, loaded) -> bytes:
    from pipeline.dataset import TOKENIZER, load_manifest
    from pipeline.storage import filesystem, join
    from pipeline.tokenizer import tokenizer_hash

    manifest = load_manifest(dataset)  # DatasetError if not prepared
    fs, path = filesystem(dataset)
    try:
        model_bytes = fs.cat_file(join(path, TOKENIZER))
    except FileNotFoundError:
        raise ExportError(f"the model's tokenizer, {join(dataset, TOKENIZER)}, is gone: prepare the dataset again "
                          "(`gss prepare` with the model's data config) or restore the file") from None
    sha = tokenizer_hash(model_bytes)
    if manifest["tokenizer"]["vocab_size"] != loaded.model.cfg.vocab_size or (
            loaded.tokenizer_sha256 and loaded.tokenizer_sha256 != sha):
        raise ExportError(f"{loaded.uri} was trained with another tokenizer than {dataset}'s; export it with the "
                          "data config it was trained on")
    return model_bytes


def _write(folder: str, loaded, tokenizer: bytes, facts: dict[str, Any], sampling: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    from pipeline.tokenizer import EOD_PIECE, Tokenizer

    model_cfg = loaded.model.cfg
    eod = Tokenizer(tokenizer).eod_id
    for code in CODE_DIRS:
        for name in sorted(os.listdir(code)):
            if name.endswith(".py") and name != "__init__.py":  # the folder is a package of its own
                shutil.copyfile(os.path.join(code, name), os.path.join(folder, name))
    weights = {f"model.{k}": v.detach().cpu().contiguous() for k, v in loaded.model.state_dict().items()}
    if model_cfg.tie_embeddings:
        del weights["model.head.weight"]  # one tensor; from_pretrained ties it again (_tied_weights_keys)
    save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    special = {"bos_token_id": eod, "eos_token_id": eod, "pad_token_id": eod}
    _json(folder, "config.json", {
        "architectures": ["GSSForCausalLM"], "model_type": "gss", "auto_map": AUTO_MAP,
        "gss": dataclasses.asdict(model_cfg), "vocab_size": model_cfg.vocab_size,
        "tie_word_embeddings": model_cfg.tie_embeddings, "dtype": "float32", **special})
    _json(folder, "generation_config.json", {**special, "use_cache": True, **sampling})
    with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
        f.write(tokenizer)
    _json(folder, "tokenizer_config.json", {
        "tokenizer_class": "GSSTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_gss.GSSTokenizer", None]},
        "bos_token": EOD_PIECE, "eos_token": EOD_PIECE, "pad_token": EOD_PIECE, "unk_token": "<unk>",
        "padding_side": "left"})  # a causal model's batch of prompts must end together: pad on the left
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(model_card(facts))


def _json(folder: str, name: str, value: dict[str, Any]) -> None:
    with open(os.path.join(folder, name), "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


def _card_facts(loaded, dataset: str, client) -> dict[str, Any]:
    """What the model card says: the model, its training run (steps, tokens seen) and eval results by length."""
    model_cfg = loaded.model.cfg
    facts: dict[str, Any] = {"source": loaded.uri, "arch": model_cfg.arch, "parameters": loaded.model.num_parameters(),
                             "model": dataclasses.asdict(model_cfg), "dataset": dataset,
                             "tokenizer_sha256": loaded.tokenizer_sha256, "evals": {}}
    experiments = [e.experiment_id for e in client.search_experiments()]
    if loaded.train_run_id:
        train = client.get_run(loaded.train_run_id)
    else:  # a checkpoint folder: the training run whose final checkpoint it is, if any
        train = run_tagged(client, experiments, Tag.CHECKPOINT, loaded.uri)
    if train is not None:
        facts.update(run_name=train.data.tags.get(Tag.RUN_NAME, ""), run_id=train.info.run_id,
                     steps=train.data.params.get("train.steps"), tokens_seen=train.data.metrics.get("tokens_seen"))
    evals = finished_evals(client, experiments, model_uri=loaded.uri)
    for run in sorted(evals, key=lambda r: r.info.start_time):  # later results of a length overwrite earlier ones
        for key in run.data.metrics:
            split, _, metric = key.partition(".")
            if metric in CARD_METRICS:
                for point in client.get_metric_history(run.info.run_id, key):
                    facts["evals"].setdefault(split, {}).setdefault(point.step, {})[metric] = point.value
    return facts


def model_card(facts: dict[str, Any]) -> str:
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [gss, state-space]", "---",
             "", f"# {facts.get('run_name') or facts['source']}", "",
             f"A {facts['arch']} language model ({facts['parameters'] / 1e6:.1f}M parameters) exported by `gss export` "
             f"from `{facts['source']}`.", "",
             "| | |", "|---|---|",
             f"| dataset | `{facts['dataset']}` |",
             f"| tokenizer sha256 | `{facts['tokenizer_sha256'] or 'not recorded'}` |",
             f"| training run | {facts.get('run_name', 'not found in MLflow')} {facts.get('run_id', '')} |",
             f"| training steps | {facts.get('steps', 'not recorded')} |",
             f"| tokens seen | {_count(facts.get('tokens_seen'))} |", ""]
    if facts["evals"]:
        lines += ["## Evaluation by length", "", "| split | length | token ppl | word ppl | bits per byte |",
                  "|---|---|---|---|---|"]
        for split, by_length in facts["evals"].items():
            for length, m in sorted(by_length.items()):
                lines.append(f"| {split} | {length} | " + " | ".join(
                    f"{m[k]:.3f}" if k in m else "" for k in CARD_METRICS) + " |")
        lines.append("")
    else:
        lines += ["No evaluation results are recorded for this model.", ""]
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'model = AutoModelForCausalLM.from_pretrained("OUT_DIR", trust_remote_code=True)',
              'tokenizer = AutoTokenizer.from_pretrained("OUT_DIR", trust_remote_code=True)',
              'ids = tokenizer("The river", return_tensors="pt").input_ids  # </s> first: a document starts after it',
              "print(tokenizer.decode(model.generate(ids, max_new_tokens=50)[0]))", "```", "",
              "`generate` decodes recurrently (one compiled step per token, the state carried), as `gss generate` "
              "does; prompts of different lengths batch, padded on the left (`tokenizer(prompts, padding=True)`); "
              "beam search is not supported. Model config:", "", "```json", json.dumps(facts["model"], indent=2),
              "```", ""]
    return "\n".join(lines)


def _count(value: float | None) -> str:
    return "not recorded" if value is None else f"{value:,.0f}"
