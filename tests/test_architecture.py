"""The layering rules, checked on the source: imports (also those inside functions) only go down the layers
runtime < evaluation < train < export < benchmarks < facekit < recipes, and no module imports itself back
through a circle. ``runtime`` never imports torch."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

#: Top-level packages in layer order (README, "Design"): a module may import only its own layer or lower.
LAYERS = ("runtime", "evaluation", "train", "export", "benchmarks", "facekit", "recipes")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    """Every module of the layered packages: dotted name → file."""
    return {_module_name(p): p for top in LAYERS for p in sorted((ROOT / top).rglob("*.py"))}


def _absolute(node: ast.ImportFrom, package: str) -> str:
    """The absolute module name of a ``from … import`` inside ``package`` (relative imports resolved)."""
    base = node.module or ""
    if not node.level:
        return base
    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join(anchor + ([base] if base else []))


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules ``name`` imports anywhere in its file (module level or inside functions), plus the
    packages Python runs on the way to them (``a.b`` for ``a.b.c``, outside ``name``'s own packages)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, package)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a non-module attribute path
                target = target.rpartition(".")[0]
            if target:
                found.add(target)
    own = {".".join(name.split(".")[:k]) for k in range(1, name.count(".") + 2)}
    with_parents = set(found)
    for target in found:
        parts = target.split(".")
        with_parents |= {".".join(parts[:k]) for k in range(1, len(parts))} - own
    return with_parents - {name}


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_imports_only_go_down_the_layers():
    rank = {top: i for i, top in enumerate(LAYERS)}
    upward = sorted(f"{a} imports {b}" for a, targets in import_graph().items() for b in targets
                    if rank[b.split(".")[0]] > rank[a.split(".")[0]])
    assert upward == [], "imports from a lower layer into a higher one:\n" + "\n".join(upward)


def test_no_import_circles():
    found = cycles(import_graph())
    assert found == [], "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)


def missing_imports(modules: dict[str, Path]) -> list[str]:
    """``file: module`` for each import (anywhere in a file) of a project module that does not exist."""
    missing = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                wanted = [_absolute(node, package)]
            elif isinstance(node, ast.Import):
                wanted = [alias.name for alias in node.names]
            else:
                continue
            missing += [f"{path.relative_to(ROOT)}:{node.lineno}: {m}" for m in wanted
                        if m.split(".")[0] in LAYERS and m not in modules]
    return missing


def test_every_project_import_names_a_module_that_exists():
    """Imports inside functions run late: a moved or deleted module would only fail when that path runs."""
    assert missing_imports(project_modules()) == []


def test_runtime_never_imports_torch():
    offenders = []
    for path in sorted((ROOT / "runtime").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "torch"]
    assert offenders == []


def test_the_checker_sees_circles_and_upward_imports():
    """The two rules above fail on what they are meant to catch (a guard against a checker that sees nothing)."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = import_graph()
    assert "runtime.backends.base" in graph["runtime.pipeline"]  # a relative import, resolved
    assert "runtime.landmarks" in graph["runtime.pipeline"]  # one made inside a function
    assert "runtime" in graph["evaluation.crops"]  # the package Python runs on the way to runtime.cpu
