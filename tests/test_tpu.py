"""TPU slices as Ray Train asks for them, from every shipped config and every override the configs list."""

import re
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.train import scaling_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(p for p in CONFIG_DIR.glob("*.yaml") if not p.name.startswith("sweep-"))  # sweeps: below


def listed_overrides(path: Path) -> list[list[str]]:
    """The runs a config's header lists (`#   gss train configs/x.yaml key=value ...`), and the file as it is."""
    runs = [[]]
    for line in path.read_text().splitlines():
        if m := re.match(rf"#\s+gss \w+ configs/{re.escape(path.name)}((?:\s+\S+=\S+)*)", line):
            runs.append(m.group(1).split())
    return runs


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_run_gets_a_scaling_config_ray_accepts(path):
    runs = listed_overrides(path)
    for overrides in runs:
        tc = load_config(path, overrides).train
        scaling = scaling_config(tc)  # what `gss train` builds; Ray validates it on construction
        assert scaling.num_workers == tc.num_workers
        if tc.worker_resources.get("TPU"):
            assert scaling.use_tpu and scaling.topology and scaling.accelerator_type == "TPU-V4"
            assert tc.backend == "xla"
        assert scaling.use_gpu == (tc.backend == "cuda")
    if path.name.startswith("paper-"):
        assert any("train.topology=2x2x4" in o for o in map(" ".join, runs)), "the v4-32 run is listed"


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("sweep-*.yaml")), ids=lambda p: p.stem)
def test_every_cell_of_the_shipped_sweeps_gets_a_scaling_config_ray_accepts(path):
    from jobs.sweep import load_sweep

    spec = load_sweep(str(path))
    for cell in spec.cells:
        tc = load_config(spec.base, cell.overrides).train
        assert scaling_config(tc).num_workers == tc.num_workers


def test_a_slice_of_four_hosts_needs_four_workers():
    from pipeline.config import ConfigError

    tc = load_config(CONFIG_DIR / "paper-pg19.yaml", ["train.topology=2x2x4"]).train  # v4-32, num_workers 1
    with pytest.raises(ConfigError, match="train.worker_resources / topology / accelerator_type: .*multiple of 4"):
        scaling_config(tc)
