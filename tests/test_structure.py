"""The layout the README promises: DeepSpeed imported by engine.py and deepspeed_workarounds.py only, no
import cycle between gptds modules, a Layout table that names every module and only paths that exist, and
the README's example outputs ignored by git."""

import ast
import re
import shutil
import subprocess

import pytest
from conftest import ROOT

DEEPSPEED_MODULES = {"gptds/engine.py", "gptds/deepspeed_workarounds.py"}


def _modules() -> dict[str, ast.Module]:
    return {str(p.relative_to(ROOT)): ast.parse(p.read_text()) for p in sorted((ROOT / "gptds").rglob("*.py"))}


def _imports(tree: ast.Module) -> set[str]:
    """Every module an import statement names, at any depth (function-local imports too)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_deepspeed_is_imported_by_the_engine_and_its_workarounds_only():
    importers = {path for path, tree in _modules().items()
                 if any(n == "deepspeed" or n.startswith("deepspeed.") for n in _imports(tree))}
    assert importers <= DEEPSPEED_MODULES, importers - DEEPSPEED_MODULES


def test_no_import_cycle_between_gptds_modules():
    def module_name(path: str) -> str:
        return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    modules = {module_name(path): tree for path, tree in _modules().items()}
    graph = {name: {m for m in _imports(tree) if m in modules and m != name} for name, tree in modules.items()}
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in graph[name]:
            if state.get(dep) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(path[path.index(dep):] + [dep])}")
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = 2
    for name in graph:
        if name not in state:
            visit(name, [name])


def test_the_readme_layout_table_matches_the_tree():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Layout"):readme.index("## Pretraining")]
    named = set()
    for cell in re.findall(r"^\| ([^|]+) \|", table, flags=re.M):
        paths = re.findall(r"`([^`]+)`", cell)
        folder = ""
        for p in paths:
            if "/" in p:
                folder = p.rsplit("/", 1)[0] + "/" if not p.endswith("/") else p
                named.add(p)
            else:  # a bare name continues the folder of the path before it
                named.add(folder + p)
    for path in named:
        assert (ROOT / path).exists(), f"README Layout names {path}, which does not exist"
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "gptds").glob("*.py") if p.name != "__init__.py"}
    missing = [m for m in modules if m not in named]
    assert not missing, f"modules missing from the README Layout table: {sorted(missing)}"


def test_the_readmes_example_outputs_are_ignored_by_git():
    """Running the README's commands in a clone (data/..., out/..., runs/...) leaves `git status` clean."""
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs a git checkout and git")
    paths = ["data/mycorpus/manifest.json", "out/gpt2-hf/config.json", "runs/pretrain/metrics.jsonl"]
    ignored = subprocess.run(["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True).stdout
    assert ignored.split() == paths


def test_the_readme_reliability_table_is_the_newest_bench_report():
    """The figures come from bench/reliability.py (which runs the suites and counts), not from a test run."""
    import importlib.util
    import json
    spec = importlib.util.spec_from_file_location("reliability_bench", ROOT / "bench" / "reliability.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    newest = bench.newest_report()
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Reliability"):readme.index("## Benchmarks")]
    assert f"`bench/results/{newest.name}`" in section, newest.name
    assert bench.readme_table(json.loads(newest.read_text())) in section
