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


def test_main_job_without_shared_corpora_reads_the_standard_library(monkeypatch, tmp_path):
    import jobs.run
    from pipeline.sources import split_files

    monkeypatch.setattr(jobs.run, "SHARED_PG19", tmp_path / "absent")  # a fresh machine: no ../shared
    cfg = jobs.run.local_config([f"root={tmp_path}"])
    assert cfg.data.source.kind == "files" and cfg.name == "local-gss"
    files = split_files(cfg.data.source, cfg.data.splits)
    assert {"train", "validation", "test"} == set(files) and all(files.values())
    assert any(f.endswith("/os.py") for split in files.values() for f in split)
    assert not any("site-packages" in f for split in files.values() for f in split)  # the library's own code only


def test_a_source_of_ones_own_replaces_the_fallback_whole(monkeypatch, tmp_path):
    """Where ../shared is absent, `gss run data.source.path=... data.source.kind=pg19` reads that PG-19 folder
    with PG-19's splits, not the standard library fallback's `**/*.py` and holdout."""
    import jobs.run

    monkeypatch.setattr(jobs.run, "SHARED_PG19", tmp_path / "absent")
    cfg = jobs.run.local_config([f"root={tmp_path}", f"data.source.path={tmp_path}", "data.source.kind=pg19"])
    default = jobs.run.load_config(jobs.run.Path(jobs.run.__file__).parents[1] / "configs" / "local.yaml", [])
    assert cfg.data.source.kind == "pg19" and cfg.data.source.splits == default.data.source.splits
    assert cfg.data.source.holdout_fraction == default.data.source.holdout_fraction
