"""The core has no import cycles: no module of `pref` imports (even inside a function) a module that imports it back."""

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "core"


def core_imports() -> dict[str, set[str]]:
    """Module name -> the core modules it imports (`pref.X` and `from pref import X`); `__init__` re-exports, so it is left out."""
    modules = {path.stem for path in CORE.glob("*.py")} - {"__init__", "__main__"}
    graph = {}
    for name in modules:
        found = set()
        for node in ast.walk(ast.parse((CORE / f"{name}.py").read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pref"):
                parts = node.module.split(".")
                found |= {parts[1]} if len(parts) == 2 else {alias.name for alias in node.names} if parts == ["pref"] else set()
            elif isinstance(node, ast.Import):
                found |= {alias.name.split(".")[1] for alias in node.names if alias.name.count(".") == 1 and alias.name.startswith("pref.")}
        graph[name] = (found & modules) - {name}
    return graph


def test_no_core_module_imports_one_that_imports_it_back():
    graph = core_imports()

    def reachable(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo.extend(graph[module])
        return seen

    cycles = sorted(name for name in graph if name in reachable(name))
    assert cycles == [], f"core modules on an import cycle: {cycles}"


def test_the_check_sees_lazy_imports():
    assert "models" in core_imports()["config"]  # imported inside a function
