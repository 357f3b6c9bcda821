"""The TPU path under PyTorch/XLA on the CPU (PJRT_DEVICE=CPU): no op may fall back to the host.

Runs in the XLA lane's own environment (torch==2.9.0, torch_xla==2.9.0; `make test` builds it).
Elsewhere it skips, unless GSS_REQUIRE_XLA=1 turns the skip into a failure.
"""

import os

import pytest
import torch

from models import DiagonalSSM, build_model

from .tiny import tiny_config

if os.environ.get("GSS_REQUIRE_XLA") != "1":
    pytest.importorskip("torch_xla", reason="torch_xla is not installed: run `make test` for the XLA lane")
import torch_xla  # noqa: E402
import torch_xla.debug.metrics as metrics  # noqa: E402

pytestmark = pytest.mark.xla


def fallback_counters() -> dict[str, int]:
    """Ops that ran on the host instead of through XLA show up as `aten::*` counters."""
    return {name: metrics.counter_value(name) for name in metrics.counter_names() if name.startswith("aten::")}


@pytest.mark.parametrize("arch", ["gss", "dss"])
def test_chunked_model_trains_on_xla_without_fallbacks(arch):
    device = torch_xla.device()
    cfg = tiny_config(arch, ssm_kernel="chunked")
    cpu_model = build_model(cfg)
    model = build_model(cfg).to(device)
    model.load_state_dict(cpu_model.state_dict())
    # .to(xla) makes new Parameters; the optimizer's weight-decay policy must survive it
    assert all(p._no_weight_decay for m in model.modules() if isinstance(m, DiagonalSSM) for p in m.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, cfg.vocab_size, (2, 37))  # 4 full SSM chunks and a partial one

    metrics.clear_all()
    for _ in range(2):
        _, loss = model(ids[:, :-1].to(device), ids[:, 1:].to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        torch_xla.sync()
    assert fallback_counters() == {}, "ops fell back to the host CPU"
    assert metrics.counter_value("ExecuteTime") or metrics.metric_data("ExecuteTime"), "nothing ran on XLA"

    # The XLA result is the CPU result.
    model.load_state_dict(cpu_model.state_dict())
    with torch.no_grad():
        on_xla = model(ids.to(device))[0].cpu()
        torch.testing.assert_close(on_xla, cpu_model(ids)[0], atol=1e-4, rtol=1e-4)


def test_fft_kernel_is_what_falls_back():
    """Guards the test above: the same check does see the FFT path's host fallback."""
    device = torch_xla.device()
    model = build_model(tiny_config("gss", ssm_kernel="fft")).to(device)
    metrics.clear_all()
    logits, _ = model(torch.randint(0, 97, (1, 16)).to(device))
    logits.sum().backward()
    torch_xla.sync()
    assert any("fft" in name for name in fallback_counters())


def test_ray_train_on_the_xla_backend_learns_compiles_once_and_finds_its_graphs_in_the_cache(tmp_path, ray_cluster,
                                                                                           record_property):
    """`gss train` with train.backend=xla: our Ray Train backend, torch_xla SPMD over the process's 4 devices.

    No op falls back to the host; the number of compiled graphs stops growing once the first validation and
    metrics have run (step 3 on: no new graph per step, per learning rate or per report); a second run on the
    same root finds every graph in the persistent compilation cache.
    """
    import mlflow

    from pipeline.config import load_config
    from pipeline.prepare import prepare
    from pipeline.train import train_stage
    from tests.corpus import TINY_MODEL, as_overrides, run_config, write_pg19

    write_pg19(tmp_path / "corpus", counts=(6, 2, 2), words=(2000, 4000))
    tree = run_config(tmp_path / "out", tmp_path / "corpus", "xla", steps=8, num_workers=1, backend="xla",
                      global_batch_tokens=512, eval_every=2, checkpoint_every=4, log_every=1)
    tree["train"]["model"] = {**TINY_MODEL, "ssm_kernel": "chunked", "ssm_chunk": 16}
    cfg = load_config(None, as_overrides(tree))
    prepare(cfg)
    first = train_stage(cfg)["run_id"]
    client = mlflow.MlflowClient()  # after train_stage, which points MLflow at the run's store

    def history(run_id: str, key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run_id, key)}

    losses = history(first, "loss")
    record_property("loss_drop", losses[1] - losses[8])
    assert len(losses) == 8 and losses[8] < losses[1]
    assert client.get_run(first).data.tags["gss.xla_fallbacks"] == "{}", "ops fell back to the host CPU"
    compiles = history(first, "xla_compiles")
    assert compiles[1] > 0 and len({n for step, n in compiles.items() if step >= 3}) == 1, compiles

    cached = sorted((tmp_path / "out" / "xla_cache").iterdir())
    assert len(cached) == compiles[8] == history(first, "xla_cache_misses")[8]  # every graph went to the cache

    # A restart (a new process, as after a Spot preemption) finds every graph in the cache: no miss, no new
    # entry. On a TPU that means no compilation; torch_xla 2.9's CPU runtime cannot load a compiled program
    # back (counter PersistentCacheDeserializeFailure) and so compiles it again, which only the TPU avoids.
    again = train_stage(load_config(None, [*as_overrides(tree), "name=xla-again"]))["run_id"]
    assert set(history(again, "xla_cache_misses").values()) == {0}, history(again, "xla_cache_misses")
    assert sorted((tmp_path / "out" / "xla_cache").iterdir()) == cached


def test_gss_train_reserves_a_simulated_two_host_tpu_slice(tmp_path):
    """Ray Train's TPU slice reservation (use_tpu, topology, accelerator_type) on nodes that look like a v4-16."""
    import json
    import subprocess
    import sys

    import mlflow

    from tests.corpus import fresh_process_env

    job = subprocess.run([sys.executable, "-m", "tests.tpu_slice", str(tmp_path)], env=fresh_process_env(),
                         capture_output=True, text=True, timeout=500)
    assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
    result = json.loads(job.stdout.strip().splitlines()[-1])
    client = mlflow.MlflowClient(result["tracking_uri"])
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["train.num_workers"] == "2"
    assert max(m.step for m in client.get_metric_history(result["run_id"], "loss")) == 4  # the last step


def xla_steps(tmp_path, devices: int, resume_at: int = 0) -> dict:
    """tests/xla_steps.py in a process with `devices` CPU devices."""
    import json
    import subprocess
    import sys

    out = tmp_path / f"steps-{devices}-{resume_at}.json"
    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": str(devices)}
    job = subprocess.run([sys.executable, "-m", "tests.xla_steps", str(out), str(resume_at)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stderr[-3000:]
    return json.loads(out.read_text())


def test_four_devices_train_like_one_and_resume_from_a_checkpoint_alike(tmp_path):
    """SPMD data parallel: the same rows on 1 or 4 devices give the same losses; the batch is split by rows over
    the 4 devices; a checkpoint saved under SPMD and loaded into a fresh model continues the same losses."""
    one, four = xla_steps(tmp_path, 1), xla_steps(tmp_path, 4)
    assert (one["devices"], four["devices"]) == (1, 4)
    assert four["sharding"] == "{devices=[4,1]0,1,2,3}"  # rows over the 4 devices, the sequence whole
    torch.testing.assert_close(four["losses"], one["losses"], rtol=1e-5, atol=1e-5)
    resumed = xla_steps(tmp_path, 4, resume_at=3)
    torch.testing.assert_close(resumed["losses"], four["losses"], rtol=1e-6, atol=1e-6)
