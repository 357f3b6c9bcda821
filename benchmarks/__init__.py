"""On-demand benchmarks (never timing asserts). Run from the repo root: `python -m benchmarks.<script> --help`."""
