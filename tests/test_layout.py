"""The package's module graph has no import cycles (issue 12.5)."""

import ast
from pathlib import Path

import allocation

PACKAGE = Path(allocation.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: frozenset = frozenset()) -> set:
    """Modules of the package that ``path`` imports anywhere (module level or inside functions).

    ``from pkg import sub`` counts as importing ``pkg.sub`` alone when ``sub`` is one of ``modules``."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = (base + "." + node.module if node.module else base) if node.level else node.module
            submodules = {f"{target}.{alias.name}" for alias in node.names} & modules
            found.update(submodules if len(submodules) == len(node.names) else submodules | {target})
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("allocation")}


def _graph() -> dict:
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    names = frozenset(modules)
    return {name: (_imports(path, names) & names) - {name} for name, path in modules.items()}


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


def test_the_activation_sources_do_not_import_the_loader_that_dispatches_to_them():
    """sae/data.py imported synthetic/minilm/hf inside load_activations while they imported data.py
    for ArraySource and the checks; now they build on sae/sources.py and only data.py imports them."""
    graph = _graph()
    for source in ("allocation.sae.synthetic", "allocation.sae.minilm", "allocation.sae.hf", "allocation.sae.sources"):
        assert not _reaches(graph, source, "allocation.sae.data"), f"{source} imports allocation.sae.data"


def test_the_package_has_no_import_cycles():
    graph = _graph()
    cycles = sorted((a, b) for a in graph for b in graph[a] if _reaches(graph, b, a))
    assert not cycles, f"modules importing each other: {cycles}"
