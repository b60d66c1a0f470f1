"""The shape of the code, checked from the source: imports flow one way
(models <- service <- workers), only the entry point knows both sides, everything is imported
through the ftune namespace, and no function outgrows the design."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"models": "ftune.models", "service": "ftune.service", "workers": "ftune.workers",
            "ftune": "ftune"}
# The process entry point: the `ftune` command and the launcher behind `ftune up`.
ENTRY_POINTS = {"ftune/cli.py", "ftune/launcher.py"}
MAX_FUNCTION_LINES = 60


def _sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in PACKAGES:
        parts[0] = PACKAGES[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, known: set[str] | None = None) -> list[tuple[int, str]]:
    """Every module ``path`` imports (absolute, relative resolved), with its line.

    With ``known`` module names, ``from package import submodule`` counts as importing the
    submodule rather than the package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            submodules = [f"{module}.{a.name}" for a in node.names
                          if known and f"{module}.{a.name}" in known]
            found += [(node.lineno, m) for m in submodules or [module]]
    return found


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_imports_flow_one_way():
    rules = {"models": ("ftune.service", "ftune.workers"), "service": ("ftune.workers",)}
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {module}"
             for folder, banned in rules.items() for path in _sources(folder)
             for line, module in _imports(path) if any(_under(module, b) for b in banned)]
    assert not wrong, "imports must flow models <- service <- workers:\n" + "\n".join(wrong)


def test_only_the_entry_point_knows_both_sides():
    both = []
    for path in _sources("ftune", "models", "service", "workers"):
        modules = [m for _, m in _imports(path)]
        rel = path.relative_to(ROOT).as_posix()
        if (rel.startswith("ftune/") and rel not in ENTRY_POINTS
                and any(_under(m, "ftune.workers") for m in modules)):
            both.append(rel)
    assert not both, f"only {sorted(ENTRY_POINTS)} may import the workers from ftune/: {both}"


def test_nothing_imports_the_bare_folder_names():
    # `import models` would load a second copy of every module (two SQLAlchemy metadatas).
    bare = [f"{path.relative_to(ROOT)}:{line} imports {module}"
            for path in _sources("ftune", "models", "service", "workers", "tests", "bench")
            for line, module in _imports(path)
            if module.split(".")[0] in ("models", "service", "workers")]
    assert not bare, "import through the namespace (ftune.models, ...):\n" + "\n".join(bare)


def test_the_checker_sees_imports_inside_functions():
    sample = ROOT / "service" / "app.py"
    assert any(module == "ftune.service.lifecycle.reconciler" for _, module in _imports(sample))


def test_the_engine_has_no_import_loops():
    known = {_module_name(p) for p in _sources("models")}
    graph = {_module_name(p): {m for _, m in _imports(p, known) if _under(m, "ftune.models")}
             for p in _sources("models")}

    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return [*path, nxt]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
        return None

    loops = [c for m in graph if (c := cycle_from(m)) and m != "ftune.models"]
    # ftune.models/__init__ lazily re-exports submodules by name only, so it is not a loop.
    assert not loops, f"import loops in the engine: {loops[:3]}"


# The benchmarks too: each is read to learn what a number means, so its steps have names.
@pytest.mark.parametrize("folder", ["models", "service", "workers", "ftune", "bench"])
def test_no_function_outgrows_the_design(folder):
    long = []
    for path in _sources(folder):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines})")
    assert not long, f"split into named steps (over {MAX_FUNCTION_LINES} lines): {long}"


def test_every_package_folder_is_declared_for_installation():
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                   ["packages"])
    found = {_module_name(p) for folder in PACKAGES for p in (ROOT / folder).rglob("__init__.py")}
    assert found == declared, {"missing": found - declared, "stale": declared - found}
