"""The package's module graph: the exact solvers do not import each other in a cycle (issue 12.5)."""

import ast
from pathlib import Path

import allocation

PACKAGE = Path(allocation.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set:
    """Modules of the package that ``path`` imports anywhere (module level or inside functions)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = (base + "." + node.module if node.module else base) if node.level else node.module
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("allocation")}


def _graph() -> dict:
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: {dep for dep in _imports(path) if dep in modules and dep != name} for name, path in modules.items()}


def _reaches(graph: dict, start: str, goal: str) -> bool:
    seen, stack = set(), [start]
    while stack:
        node = stack.pop()
        for dep in graph.get(node, ()):
            if dep == goal:
                return True
            if dep not in seen:
                seen.add(dep)
                stack.append(dep)
    return False


def test_exact_solve_and_the_torch_auction_do_not_import_each_other_in_a_cycle():
    """exact/solve.py imported exact_torch/solver.py (backend 'torch') and the auction's scipy fallback
    imported allocation.exact.solve back; now both reach the LP through exact/lp_solve.py."""
    graph = _graph()
    for a, b in (("allocation.exact.solve", "allocation.exact_torch.solver"),):
        assert not (_reaches(graph, a, b) and _reaches(graph, b, a)), f"{a} and {b} import each other"
    assert not _reaches(graph, "allocation.exact_torch.solver", "allocation.exact.solve")
