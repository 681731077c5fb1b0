"""The package's layers: every import runs down the order below, and no modules import each other in
a circle. Read from the source with `ast`; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "grok"

# Each part of the package and its rank: a module may import its own part, or a part of lower rank.
LAYERS = {
    "grok.native": 0,
    "grok.model": 1,
    "grok.parallel": 2,
    "grok.checkpoint": 3,
    "grok.serving": 4,
    "grok.planning": 5,
    "grok.server": 5,
    "grok.cli": 6,
    "grok": 6,  # grok/__init__.py: the Python API's re-exports
}


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package at `root`."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported module of the package, line) for every import in the file, wherever it stands
    (inside functions and `if TYPE_CHECKING:` too)."""
    package = name.split(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package upward
                here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.append((child if child in modules else base, node.lineno))
    return [(module, line) for module, line in found if module.split(".")[0] == package]


def part(module: str) -> str:
    """The entry of `LAYERS` a module belongs to: its longest prefix there."""
    pieces = module.split(".")
    for n in range(len(pieces), 0, -1):
        if ".".join(pieces[:n]) in LAYERS:
            return ".".join(pieces[:n])
    raise AssertionError(f"{module} belongs to no layer: add its subpackage to LAYERS in tests/test_layout.py")


def layer_violations(root: Path) -> list[str]:
    """Every import that runs up (or sideways) across `LAYERS`, then every circle of imports."""
    modules = module_files(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    problems = []
    for name, path in modules.items():
        for imported, line in imports_of(name, path, modules):
            target = imported if imported in modules else part(imported)
            graph[name].add(target)
            mine, theirs = part(name), part(imported)
            if mine != theirs and LAYERS[theirs] >= LAYERS[mine]:
                problems.append(
                    f"{path.relative_to(root.parent)}:{line} imports {imported} "
                    f"({modules.get(target, target)}): {theirs} is not below {mine}"
                )
    problems += [f"import circle: {' -> '.join(circle)}" for circle in circles(graph, modules, root.parent)]
    return problems


def circles(graph: dict[str, set[str]], modules: dict[str, Path], base: Path) -> list[list[str]]:
    """One circle (as the files on it, first file repeated at the end) per back edge of a depth-first search."""
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt == node or nxt not in graph:
                continue
            if state.get(nxt) == "open":
                loop = stack[stack.index(nxt):] + [nxt]
                found.append([str(modules[m].relative_to(base)) for m in loop])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_package_keeps_its_layers():
    problems = layer_violations(PACKAGE)
    assert not problems, "\n".join(problems)


def test_every_subpackage_has_a_layer():
    subpackages = {f"grok.{p.name}" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert subpackages <= set(LAYERS), subpackages - set(LAYERS)


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "grok"


def test_an_upward_import_is_named_with_both_files(tmp_path):
    root = _write(tmp_path, {
        "grok/__init__.py": "",
        "grok/model/__init__.py": "",
        "grok/model/ops.py": "def f():\n    from grok.serving import engine\n",
        "grok/serving/__init__.py": "",
        "grok/serving/engine.py": "from grok.model import ops\n",
    })
    problems = layer_violations(root)
    assert len(problems) == 2, problems
    assert problems[0].startswith("grok/model/ops.py:2 imports grok.serving.engine (")
    assert "grok/serving/engine.py" in problems[0] and "grok.serving is not below grok.model" in problems[0]
    assert problems[1] == "import circle: grok/model/ops.py -> grok/serving/engine.py -> grok/model/ops.py"


def test_a_circle_inside_one_subpackage_is_found_even_through_type_checking(tmp_path):
    root = _write(tmp_path, {
        "grok/__init__.py": "",
        "grok/serving/__init__.py": "",
        "grok/serving/api.py": "from grok.serving.engine import Engine\n",
        "grok/serving/engine.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .api import Grok\n",
        "grok/serving/tokenizer.py": "from grok.serving import api\n",
    })
    assert layer_violations(root) == [
        "import circle: grok/serving/api.py -> grok/serving/engine.py -> grok/serving/api.py"
    ]


def test_sibling_layers_do_not_import_each_other(tmp_path):
    root = _write(tmp_path, {
        "grok/__init__.py": "",
        "grok/server/__init__.py": "",
        "grok/server/app.py": "import grok.planning.plan\n",
        "grok/planning/__init__.py": "",
        "grok/planning/plan.py": "",
    })
    [problem] = layer_violations(root)
    assert problem.startswith("grok/server/app.py:1 imports grok.planning.plan")
