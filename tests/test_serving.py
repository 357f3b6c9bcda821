"""`mlflow models serve` of a registered model: a real tiny model trained and registered by the pipeline, served by a
real MLflow scoring server process on the loopback interface; text prompts in, generated text out."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from jobs.cli import build_parser, main
from jobs.run import run_pipeline
from pipeline.config import load_config
from tests.corpus import as_overrides, fresh_process_env, run_config, write_pg19
from tests.gcs import free_port

NAME, PROMPT, NEW_TOKENS = "serve", "The river", 12
RHYME = "the quick brown fox jumps over the lazy dog.\nthe river runs down to the sea and back again.\n"
MODEL_URI = f"models:/gss-{NAME}@current"
GREEDY = {"temperature": 0, "max_new_tokens": NEW_TOKENS}


@pytest.fixture(scope="module")
def trained(ray_cluster, tmp_path_factory) -> list[str]:
    """A tiny model trained and registered by `gss run`; its config overrides."""
    root = tmp_path_factory.mktemp("serving")
    write_pg19(root / "corpus", counts=(6, 1, 1), words=(1500, 3000))
    for book in (root / "corpus").glob("*/*.txt"):  # a text a few steps learn, so that greedy text follows the prompt
        book.write_text(RHYME * 200)
    tree = run_config(root / "out", root / "corpus", NAME, steps=60, eval_every=60, checkpoint_every=60,
                      lr=1e-2)
    tree["eval"] = {"lengths": [64], "splits": ["test"], "piece_tokens": 64}
    overrides = as_overrides(tree)
    run_pipeline(load_config(None, overrides))
    return overrides


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory) -> Iterator[str]:
    """`mlflow models serve` of the registered model as a user starts it (this Python's environment, the run's
    tracking store); its base URL. Stopped, with its uvicorn, at the end."""
    import mlflow

    url = f"http://127.0.0.1:{free_port()}"
    log = tmp_path_factory.mktemp("server") / "server.log"
    bin_dir = os.path.dirname(sys.executable)  # `mlflow`, and the `uvicorn` it starts
    env = fresh_process_env(MLFLOW_TRACKING_URI=mlflow.get_tracking_uri(), PATH=f"{bin_dir}:{os.environ['PATH']}")
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [os.path.join(bin_dir, "mlflow"), "models", "serve", "-m", MODEL_URI, "--env-manager", "local",
             "-p", url.rsplit(":", 1)[1], "-h", "127.0.0.1"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # its own group, uvicorn in it
    try:
        deadline = time.monotonic() + 180
        while not _answers(f"{url}/ping"):
            assert process.poll() is None, f"the server exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no answer at {url}/ping in 180 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def loaded(trained):
    """The registered model loaded in this process, as `mlflow.pyfunc.load_model` gives it."""
    import mlflow

    return mlflow.pyfunc.load_model(MODEL_URI)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def invoke(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    """POST `body` to /invocations: the status and the decoded JSON answer."""
    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def generated(url: str, prompts: list[str], **params: Any) -> list[str]:
    status, answer = invoke(url, {"inputs": prompts, "params": params})
    assert status == 200, answer
    return answer["predictions"]


def test_a_prompt_gets_the_text_gss_generate_prints(trained, server, capsys):
    (text,) = generated(server, [PROMPT], **GREEDY)
    main(["generate", *trained, "--prompt", PROMPT, "--max-new-tokens", str(NEW_TOKENS), "--temperature", "0",
          "--dtype", "fp32"])  # as the served model decodes (on the CPU), where a GPU would make `auto` bf16
    assert capsys.readouterr().out == PROMPT + text + "\n"  # `gss generate` prints the prompt, then the new text
    assert text


def test_prompts_of_different_lengths_in_one_request_each_get_their_own_text(server):
    prompts = [PROMPT, "the quick brown fox jumps over", "dog.\nthe river runs down to the sea and back"]
    alone = [generated(server, [prompt], **GREEDY)[0] for prompt in prompts]
    assert generated(server, prompts, **GREEDY) == alone  # left-padded to the longest, in one batch
    assert len(set(alone)) == len(prompts), alone  # the model has learnt RHYME: each prompt leads elsewhere


def test_sampling_params_default_to_gss_generates_and_a_sample_is_text(server):
    """A request without params samples with `gss generate`'s defaults: max_new_tokens=200, temperature 0.8,
    top_k 40."""
    import mlflow

    generate = build_parser()[1]["generate"]
    schema = mlflow.models.get_model_info(MODEL_URI).signature.params
    assert {p.name: p.default for p in schema.params} == {
        name: generate.get_default(name) for name in ("max_new_tokens", "temperature", "top_k")}
    status, answer = invoke(server, {"inputs": [PROMPT]})
    assert status == 200 and isinstance(answer["predictions"][0], str), answer


def test_predict_stream_yields_the_served_text_piece_by_piece(server, loaded):
    """MLflow's scoring server has no streaming endpoint (3.x: /invocations only), so predict_stream is the loaded
    model's, as `mlflow.pyfunc.load_model` gives it."""
    pieces = list(loaded.predict_stream(PROMPT, params=GREEDY))
    assert len(pieces) > 1 and all(pieces)
    assert "".join(pieces) == generated(server, [PROMPT], **GREEDY)[0]


def test_token_ids_still_get_the_next_tokens_log_probabilities(server, loaded):
    ids = [[2, 40, 41, 42], [2, 50, 51, 52]]
    status, answer = invoke(server, {"inputs": ids})
    assert status == 200, answer
    np.testing.assert_allclose(answer["predictions"], loaded.predict(ids), rtol=1e-6)  # [2][vocab]


@pytest.mark.parametrize(("body", "says"), [
    ({"inputs": [PROMPT, ""]}, "prompt 1 is empty"),
    ({"inputs": [PROMPT], "params": {"max_new_tokens": -1}}, "max_new_tokens=-1: give 0 to 8192"),
    ({"inputs": ["the sea " * 5000]}, r"prompt 0 is \d+ tokens long: at most 8192 are read"),
    ({"inputs": [PROMPT], "params": {"temperature": -0.5}}, r"temperature=-0.5: give 0 \(greedy\) or more"),
    ({"inputs": [PROMPT], "params": {"top_k": 0}}, "top_k=0: give 1 or more"),
    ({"inputs": [PROMPT, [2, 40]]}, "input 1 is \\[2, 40\\]: give text prompts \\(strings\\) only, or lists of token"),
])
def test_a_bad_request_gets_a_400_that_says_why_and_the_server_goes_on(server, body, says):
    status, answer = invoke(server, body)
    assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE", answer
    assert re.search(says, answer["message"]), answer["message"][-500:]
    assert generated(server, [PROMPT], **GREEDY)[0]
