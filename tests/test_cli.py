"""The `gss` command line, run as users run it."""

import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import main


def test_params_lists_every_preset(capsys):
    main(["params"])
    out = capsys.readouterr().out
    assert "paper-gss " in out and "192.4M" in out and "small-transformer" in out


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(SystemExit, match="unknown preset 'nope'; choose from paper-gss"):
        main(["params", "nope"])


def test_demo_trains_evaluates_and_samples(tmp_path: Path):
    source = Path(__file__).resolve().parents[1] / "models"
    for path in source.glob("*.py"):  # real text: this project's own code
        (tmp_path / path.name).write_bytes(path.read_bytes())
    result = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "demo", "--corpus", str(tmp_path), "--steps", "8", "--seq-len", "32",
         "--batch-size", "4"],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert "held-out bits per byte" in result.stdout
    assert "128 bytes (4x)" in result.stdout
    assert "recurrent decoding" in result.stdout


def test_demo_without_text_says_what_to_do(tmp_path: Path):
    with pytest.raises(SystemExit, match="pass --corpus a folder or glob"):
        main(["demo", "--corpus", str(tmp_path / "missing")])
