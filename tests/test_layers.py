"""The import layers: who may import whom among the project's own packages, read from the source
(every ``import X`` and ``from X import Y``, function-level ones included), no module imported.

    core      imports nothing of ours
    model     imports core only
    pipeline  imports core and model only (never train, infer, benchmarks)
    train     imports no infer (the end-of-run report's code lives in train)
    infer     imports no benchmarks

and no two modules import each other, directly or round a longer loop. Besides: no file of these
packages is longer than ``MAX_FILE_LINES`` and no function than ``MAX_FUNCTION_LINES``, and no
test module imports another (shared helpers live in ``tests/helpers.py`` and ``conftest.py``).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "pipeline", "model", "train", "infer", "benchmarks")
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80  # from the ``def`` line to the last line of the body


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest of ``name``'s prefixes that is one of our modules."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Our modules that ``module`` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` mod itself
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        for name in names:
            target = _resolve(name, modules)
            if target is not None and target != module:
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def _package(module: str) -> str:
    return module.split(".")[0]


def _crossings(source: str) -> dict[str, set[str]]:
    """Each module of package ``source`` and the packages (other than its own) it imports."""
    out = {}
    for module, targets in import_graph().items():
        if _package(module) == source:
            others = {_package(t) for t in targets} - {source}
            if others:
                out[module] = others
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One loop through each strongly connected group of two or more modules (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_core_imports_nothing_of_ours():
    assert _crossings("core") == {}


def test_model_imports_only_core():
    bad = {m: p for m, p in _crossings("model").items() if p - {"core"}}
    assert bad == {}


def test_pipeline_imports_no_train_or_infer():
    bad = {m: p for m, p in _crossings("pipeline").items() if p - {"core", "model"}}
    assert bad == {}


def test_train_imports_no_infer():
    bad = {m: p for m, p in _crossings("train").items() if "infer" in p}
    assert bad == {}


def test_no_package_but_benchmarks_imports_benchmarks():
    bad = {
        m: p
        for package in ("core", "pipeline", "model", "train", "infer")
        for m, p in _crossings(package).items()
        if "benchmarks" in p
    }
    assert bad == {}


def test_no_import_cycle_between_modules():
    graph = import_graph()
    assert _cycles(graph) == []


def test_the_graph_sees_the_packages():
    """The checks above would pass on an empty graph: make sure they look at the real one."""
    graph = import_graph()
    assert {"core.errors", "pipeline.make_shards", "model.models", "train.trainer"} <= set(graph)
    assert "core.errors" in graph["model.models"]


def test_no_file_is_longer_than_the_limit():
    long = {
        str(path.relative_to(ROOT)): n
        for path in _modules().values()
        if (n := len(path.read_text().splitlines())) > MAX_FILE_LINES
    }
    assert long == {}, f"files over {MAX_FILE_LINES} lines: {long}"


def test_no_function_is_longer_than_the_limit():
    long = {}
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{module}.{node.name} (line {node.lineno})"] = n
    assert long == {}, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_size_check_counts_lines_from_def_to_the_end_of_the_body():
    tree = ast.parse("def f():\n    a = 1\n\n    return a\n")
    node = tree.body[0]
    assert node.end_lineno - node.lineno + 1 == 4


def test_no_test_module_imports_another():
    tests = ROOT / "tests"
    names = {p.stem for p in tests.glob("test_*.py")}
    found = {}
    for path in sorted(tests.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                imported = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            hits = {i for i in imported if i.removeprefix("tests.") in names}
            if hits:
                found.setdefault(path.name, set()).update(hits)
    assert found == {}, f"test modules importing test modules: {found}"
