"""`gss export`: a trained and registered tiny model as a Hugging Face folder, loaded where this project is not."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs.cli import main
from jobs.export import PROJECT
from jobs.run import run_pipeline
from pipeline.config import load_config
from tests.corpus import as_overrides, run_config, write_pg19

PROMPT, NEW_TOKENS = "The river", 12

LOAD_ELSEWHERE = """
import importlib.util, json, sys
# no way back to this repository: not its editable install, not the working folder
sys.meta_path = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path_hooks = [h for h in sys.path_hooks if "editable" not in getattr(h, "__qualname__", "").lower()]
assert importlib.util.find_spec("models") is None and importlib.util.find_spec("pipeline") is None
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

folder, inputs, out = sys.argv[1:]
given = torch.load(inputs)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
calls = {"forward": 0, "prefill": 0, "start_decoding": 0}
for name in calls:  # count how generate runs the model
    method = getattr(model.model, name)
    setattr(model.model, name, lambda *a, _m=method, _n=name, **k: calls.__setitem__(_n, calls[_n] + 1) or _m(*a, **k))
with torch.no_grad():
    logits = model(given["ids"]).logits
calls["forward"] = 0
prompt = tokenizer(given["prompt"], return_tensors="pt")
generated = model.generate(**prompt, max_new_tokens=given["new_tokens"], do_sample=False)[0].tolist()
torch.save({"logits": logits, "tied": model.model.head.weight is model.model.embed.weight,
            "document": tokenizer(given["document"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id],
            "decoded": tokenizer.decode(tokenizer(given["document"]).input_ids), "prompt": prompt.input_ids[0].tolist(),
            "generated": generated, "text": tokenizer.decode(generated), "calls": calls}, out)
"""


@pytest.fixture(scope="module")
def trained(ray_cluster, tmp_path_factory):
    """A tiny model trained, registered and evaluated by `gss run`; its config overrides and result."""
    root = tmp_path_factory.mktemp("export")
    texts = write_pg19(root / "corpus", counts=(6, 1, 1), words=(1500, 3000))
    tree = run_config(root / "out", root / "corpus", "hf", steps=10, eval_every=10, checkpoint_every=10)
    tree["eval"] = {"lengths": [64, 128], "splits": ["test"], "piece_tokens": 64}
    overrides = as_overrides(tree)
    return overrides, run_pipeline(load_config(None, overrides)), texts["validation"][0]


def test_the_export_loads_in_transformers_where_this_project_is_not(trained, tmp_path, capsys):
    """Logits equal the checkpoint's; the tokenizer gives the pipeline's ids on a held-out document; greedy
    `generate` is `gss generate --temperature 0`, one prefill then the fast step per new token."""
    from models import ModelConfig, build_model
    from pipeline import checkpoint
    from pipeline.dataset import dataset_dir, read_tokenizer

    overrides, result, document = trained
    main(["generate", *overrides, "--prompt", PROMPT, "--max-new-tokens", str(NEW_TOKENS), "--temperature", "0"])
    printed = capsys.readouterr().out.rstrip("\n")
    folder = tmp_path / "hf"
    main(["export", "models:/gss-hf@current", str(folder), *overrides])

    state = checkpoint.read(result["checkpoint"])
    model = build_model(ModelConfig(**state["model_config"])).eval()
    model.load_state_dict(state["model"])
    tokenizer = read_tokenizer(dataset_dir(load_config(None, overrides)))
    ids = torch.randint(0, model.cfg.vocab_size, (2, 40))
    torch.save({"ids": ids, "prompt": PROMPT, "new_tokens": NEW_TOKENS, "document": document}, tmp_path / "in.pt")
    job = subprocess.run([sys.executable, "-c", LOAD_ELSEWHERE, str(folder), "in.pt", "out.pt"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert job.returncode == 0, job.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        torch.testing.assert_close(got["logits"], model(ids)[0], rtol=1e-5, atol=1e-5)
    assert got["tied"]
    assert got["document"] == tokenizer.encode_document(document).tolist() and got["decoded"] == document
    assert got["prompt"] == [tokenizer.eod_id] + tokenizer.sp.encode(PROMPT)  # `gss generate`'s prompt
    assert got["text"] == printed
    assert got["calls"] == {"forward": 0, "prefill": 1, "start_decoding": 1}  # then compiled steps

    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_gss.GSSForCausalLM"
    for name in ("model.py", "ssm.py", "config.py"):  # the project's code, as it is
        assert (folder / name).read_text() == (Path(PROJECT) / "models" / name).read_text()
    card = (folder / "README.md").read_text()
    assert "| training steps | 10 |" in card and "| tokens seen | 10,240 |" in card and "| test | 128 |" in card


def test_bad_inputs_are_one_line_and_leave_nothing_behind(trained, tmp_path):
    overrides, result, _ = trained
    with pytest.raises(SystemExit, match=r"^gss export: no registered model models:/nope@current") as e:
        main(["export", "models:/nope@current", str(tmp_path / "a"), *overrides])
    assert "\n" not in str(e.value)
    with pytest.raises(SystemExit, match=r"^gss export: .*nowhere is not a `gss train` checkpoint"):
        main(["export", str(tmp_path / "nowhere"), str(tmp_path / "a"), *overrides])
    assert not (tmp_path / "a").exists()

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match=r"^gss export: .*taken exists and is not an empty folder; give --force"):
        main(["export", result["checkpoint"], str(taken), *overrides])
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    main(["export", result["checkpoint"], str(taken), *overrides, "--force"])  # a checkpoint folder, replacing
    assert not (taken / "keep.txt").exists() and (taken / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no temporary folders left

    from pipeline.dataset import TOKENIZER, dataset_dir

    tokenizer = Path(dataset_dir(load_config(None, overrides))) / TOKENIZER
    tokenizer.rename(tmp_path / "away")
    try:
        with pytest.raises(SystemExit, match=r"^gss export: the model's tokenizer, .*, is gone: prepare"):
            main(["export", "models:/gss-hf@current", str(tmp_path / "b"), *overrides])
    finally:
        (tmp_path / "away").rename(tokenizer)
    assert not (tmp_path / "b").exists()


EVERY_ARCH_ELSEWHERE = LOAD_ELSEWHERE[:LOAD_ELSEWHERE.index("folder, inputs, out")] + """
import json, shutil
folder, root = sys.argv[1:]
for arch in ("gss", "dss", "hybrid", "transformer"):
    copy = f"{root}/{arch}"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("model.safetensors"))
    config = json.load(open(f"{copy}/config.json"))
    config["gss"].update(arch=arch, attn_chunk=8)  # the hybrid's local attention crosses chunks while decoding
    json.dump(config, open(f"{copy}/config.json", "w"))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(copy, trust_remote_code=True),
                                             trust_remote_code=True).eval()
    prompt = torch.randint(3, config["vocab_size"], (1, 12))
    decoded = model.generate(prompt, max_new_tokens=20, do_sample=False)  # prefill, then one step per token
    reference = prompt
    with torch.no_grad():
        for _ in range(20):  # the whole sequence through the parallel pass for each new token
            reference = torch.cat([reference, model(reference).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(decoded, reference), arch
    # two prompts of different lengths in one batch, left-padded: each gets the tokens it gets alone
    short = prompt[:, 7:]
    batch = torch.cat([prompt, torch.cat([torch.full((1, 7), 3), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :7] = 0
    both = model.generate(batch, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=3)
    alone = model.generate(short, max_new_tokens=20, do_sample=False)
    assert torch.equal(both[0], decoded[0]) and torch.equal(both[1, 12:], alone[0, 5:]), arch
"""


def test_every_architecture_decodes_recurrently_as_its_parallel_pass_reads(trained, tmp_path):
    """transformers' greedy `generate` equals the parallel pass token for token, and a left-padded batch gives each
    prompt its own tokens, for every architecture."""
    overrides, result, _ = trained
    main(["export", result["checkpoint"], str(tmp_path / "hf"), *overrides])
    job = subprocess.run([sys.executable, "-c", EVERY_ARCH_ELSEWHERE, str(tmp_path / "hf"), str(tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert job.returncode == 0, job.stderr[-3000:]
