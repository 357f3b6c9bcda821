"""The house rules, read from the source: models/ knows nothing of the pipeline, and imports go one way."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "pipeline", "jobs")


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function (as dotted names)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pipeline import x`
    return found


def graph(root: Path) -> dict[str, set[str]]:
    """Our modules under `root` -> the modules of ours each imports."""
    modules = {f"{p.parent.name}.{p.stem}": p for package in PACKAGES for p in (root / package).glob("*.py")
               if p.stem != "__init__"}
    return {name: {m for m in imports(path) if m in modules} for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a -> b -> ... -> a), or None."""

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        return next(filter(None, (visit(t, path + [module]) for t in sorted(edges[module]))), None)

    return next(filter(None, (visit(m, []) for m in sorted(edges))), None)


def test_models_import_no_pipeline_no_ray_no_mlflow():
    for path in (REPO / "models").glob("*.py"):
        roots = {name.split(".")[0] for name in imports(path)}
        assert not roots & {"pipeline", "jobs", "ray", "mlflow", "torch_xla"}, path.name


def test_imports_point_down_and_never_in_a_circle():
    edges = graph(REPO)
    for module, targets in edges.items():
        if module.startswith("pipeline."):
            assert not any(t.startswith("jobs.") for t in targets), f"{module} imports upward into jobs/"
    assert "pipeline.train" not in edges["pipeline.evaluate"], "evaluation must not need the training code"
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_the_cycle_check_sees_a_cycle_through_a_function_level_import(tmp_path):
    for package in PACKAGES:
        (tmp_path / package).mkdir()
    (tmp_path / "jobs" / "a.py").write_text("from jobs.b import f\n")
    (tmp_path / "jobs" / "b.py").write_text("def f():\n    from jobs import a\n")
    assert find_cycle(graph(tmp_path)) == ["jobs.a", "jobs.b", "jobs.a"]


def test_mlflow_search_filters_and_tags_are_written_in_tracking_alone():
    """Every query the pipeline makes of MLflow is a named one in pipeline/tracking.py, every tag it sets is a
    `Tag` (a filter or a tag name written by hand elsewhere would drift from the tags as they change), and every
    client is given its store's address (one without takes whatever store the process last pointed MLflow at)."""
    import re

    from pipeline.tracking import Tag

    tags = {value for key, value in vars(Tag).items() if key.isupper()}
    by_hand = re.compile(r"search_runs\(|search_model_versions\(|tags\.`|attributes\.|MlflowClient\(\)")
    for package in ("pipeline", "jobs"):
        for path in (REPO / package).glob("*.py"):
            if path.name == "tracking.py":
                continue
            source = path.read_text()
            strings = {node.value for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Constant)
                       and isinstance(node.value, str)}
            assert not {s for s in strings if any(s.startswith(tag) for tag in tags)}, path.relative_to(REPO)
            assert not [line for line in source.splitlines() if by_hand.search(line)], path.relative_to(REPO)


def test_ruff_finds_nothing():
    """pyproject.toml's rules: pyflakes, pycodestyle (lines of at most 120 characters), import order."""
    import subprocess
    import sys

    found = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO, capture_output=True,
                           text=True)
    assert found.returncode == 0, found.stdout[-5000:]
