"""The package's shape, read with ast: small modules, no reaching into other modules' private names, the CLI at
the top (nothing imports it), and no import cycles (function-local imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_memdec"
MAX_LINES = 450
ENTRY_POINT = "lightning_memdec.__main__"  # `python -m lightning_memdec` runs the CLI: above it, not below


def _modules() -> dict[str, ast.Module]:
    return {f"lightning_memdec.{p.stem}": ast.parse(p.read_text(encoding="utf-8")) for p in PACKAGE.glob("*.py")}


def _import_graph() -> dict[str, set[str]]:
    return {name: _imported(tree, name) for name, tree in _modules().items() if name != ENTRY_POINT}


def _sources() -> dict[Path, ast.Module]:
    files = [*PACKAGE.glob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    return {p: ast.parse(p.read_text(encoding="utf-8")) for p in files}


def _imported(tree: ast.Module, own: str | None = None) -> set[str]:
    """lightning_memdec modules imported anywhere in a file (``from lightning_memdec import x`` counts as x)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lightning_memdec.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "lightning_memdec":
                found |= {f"lightning_memdec.{a.name}" for a in node.names}
            elif node.module.startswith("lightning_memdec."):
                found.add(node.module)
    return found - {own}


def test_no_module_is_too_long():
    long = {
        p.name: n for p in PACKAGE.glob("*.py") if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_private_names_across_modules():
    bad = []
    for path, tree in _sources().items():
        # names bound to lightning_memdec modules: `import lightning_memdec.x as y`, `from lightning_memdec import x`
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("lightning_memdec.") and a.asname:
                        aliases[a.asname] = a.name
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning_memdec"):
                for a in node.names:
                    if node.module == "lightning_memdec":
                        aliases[a.asname or a.name] = f"lightning_memdec.{a.name}"
                    elif a.name.startswith("_"):
                        bad.append(f"{path.name}:{node.lineno} imports {node.module}.{a.name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                target = node.value
                module = aliases.get(target.id) if isinstance(target, ast.Name) else None
                if module is None and isinstance(target, ast.Attribute):
                    module = ast.unparse(target) if ast.unparse(target).startswith("lightning_memdec.") else None
                if module is not None:
                    bad.append(f"{path.name}:{node.lineno} uses {module}.{node.attr}")
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_nothing_imports_the_cli():
    importers = [name for name, deps in _import_graph().items() if "lightning_memdec.cli" in deps]
    assert not importers, f"the CLI is the top of the package, but {importers} import it"


def test_no_import_cycles():
    graph = _import_graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycle = path[path.index(dep) :] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


MAX_FUNCTION_LINES = 60
REASONS = ("on purpose", "long by", "long because")  # a long function says why in its docstring


def test_no_long_function_without_a_reason():
    long = []
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node) or ""
            first = node.body[1] if doc and len(node.body) > 1 else node.body[0]
            lines = node.end_lineno - first.lineno + 1  # the body, docstring excluded
            if lines > MAX_FUNCTION_LINES and not any(r in doc.lower() for r in REASONS):
                long.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions over 60 lines without a reason in their docstring:\n" + "\n".join(long)
