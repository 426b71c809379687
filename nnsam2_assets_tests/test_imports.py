"""The house's import rules, read from the source with ``ast`` (imports inside functions included):

- no import cycle among the product's modules;
- the domain packages (everything but ``defs``, the definitions and executors, the runner, the CLI and its
  console) never import Dagster;
- the product never imports the tests, the benchmarks or its ``testing`` helpers;
- the tests and the benchmarks never import each other.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCT = "nnsam2_assets"
# the Dagster layer; everything else in the product is domain code
DAGSTER_LAYER = (
    "nnsam2_assets.defs",
    "nnsam2_assets.definitions",
    "nnsam2_assets.executors",  # which Dagster executor runs the steps
    "nnsam2_assets.step_preload",  # what the steps' fork server imports and builds before it forks them
    "nnsam2_assets.runner",
    "nnsam2_assets.cli",
    "nnsam2_assets.console",  # the terminal side of ``nnsam2 run``: Dagster's run loggers and results
)
SUPPORT = ("nnsam2_assets.testing",)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(top: str) -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((REPO / top).rglob("*.py"))}


def _imports(path: Path, module: str) -> set[str]:
    """Every module named by an import statement anywhere in the file (relative imports resolved)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out |= {f"{base}.{alias.name}" for alias in node.names}
    return out


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The module of ``known`` an imported name refers to (``a.b.func`` -> ``a.b``), or None."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def _graph(top: str) -> dict[str, set[str]]:
    known = _modules(top)
    return {
        mod: {t for t in (_resolve(n, known) for n in _imports(path, mod)) if t and t != mod}
        for mod, path in known.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _in(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_walker_sees_lazy_relative_and_aliased_imports(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from . import b\n    import pkg.c as c\n    from .b import x\n")
    assert _imports(pkg / "a.py", "pkg.a") >= {"pkg", "pkg.b", "pkg.c", "pkg.b.x"}
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_in_the_product():
    assert _cycles(_graph(PRODUCT)) == []


def test_domain_code_imports_no_dagster():
    offenders = {
        mod: sorted(n for n in _imports(path, mod) if n.split(".")[0] in {"dagster", "dagster_duckdb"})
        for mod, path in _modules(PRODUCT).items()
        if not _in(mod, DAGSTER_LAYER + SUPPORT)
    }
    assert {m: n for m, n in offenders.items() if n} == {}


def test_the_product_never_imports_tests_bench_or_its_testing_helpers():
    offenders = {
        mod: sorted(n for n in _imports(path, mod) if _in(n, ("nnsam2_assets_tests", "bench", *SUPPORT)))
        for mod, path in _modules(PRODUCT).items()
        if not _in(mod, SUPPORT)
    }
    assert {m: n for m, n in offenders.items() if n} == {}


@pytest.mark.parametrize(
    ("top", "other"), [("nnsam2_assets_tests", "bench"), ("bench", "nnsam2_assets_tests")]
)
def test_tests_and_bench_never_import_each_other(top, other):
    offenders = {
        mod: sorted(n for n in _imports(path, mod) if _in(n, (other,))) for mod, path in _modules(top).items()
    }
    assert {m: n for m, n in offenders.items() if n} == {}


# Libraries that only some steps use, each a large import: every process that loads the code location (the
# CLI, the UI's code server, each run's step fork server) would pay them otherwise.
ON_USE_ONLY = (
    "pingouin",
    "statsmodels",
    "scipy.stats",
    "highdicom",
    "pydicom",
    "matplotlib",
    "torch",
    "nnunetv2",
)


def test_loading_the_code_location_leaves_step_only_libraries_unimported():
    probe = (
        "import sys; from nnsam2_assets.definitions import defs; defs().get_repository_def(); "
        f"print(','.join(m for m in {ON_USE_ONLY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imported when the code location loads: {out.stdout.strip()}"


def test_the_pipeline_without_dagster_never_imports_it():
    # testing.direct (the benchmarks' direct side, also the step-cost bench's fresh process) and the settings
    # it takes: the Dagster resources are only their configuration schema
    probe = "import sys, nnsam2_assets.testing.direct, bench.direct_chain; print('dagster' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
