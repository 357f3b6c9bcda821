"""The `gss` command line, run as users run it."""

import pytest

from jobs.cli import main


def test_params_lists_every_preset(capsys):
    main(["params"])
    out = capsys.readouterr().out
    assert "paper-gss " in out and "192.4M" in out and "small-transformer" in out


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(SystemExit, match="unknown preset 'nope'; choose from paper-gss"):
        main(["params", "nope"])
