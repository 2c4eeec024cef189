"""Import layering, read from the source (``ast``, nothing is imported): kernels <- model <- platform <-
jobs / cli; nothing imports ``jobs`` from outside it; ``kernels`` and ``model`` import neither Ray nor
pydantic; Triton is imported only in ``kernels``; and no import cycle. Every ``import`` statement
counts, also those inside functions (a lazy import still makes the dependency)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "expertpool"
LAYERS = {"errors": -1, "kernels": 0, "model": 1, "platform": 2, "jobs": 3, "cli": 3}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> set[str]:
    """The absolute names a module imports; ``from pkg import sub`` counts as ``pkg.sub`` when
    ``sub`` is a module of the package."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in MODULES else base)
    return out


IMPORTS = {name: _imports(name) for name in MODULES}


def _layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "expertpool" else None


def test_the_package_is_found():
    assert {"expertpool.kernels.backend", "expertpool.model.dispatch", "expertpool.platform.config",
            "expertpool.jobs.train", "expertpool.cli"} <= set(MODULES)


def test_imports_flow_one_way():
    wrong = []
    for name, imported in IMPORTS.items():
        here = _layer(name)
        for target in imported:
            there = _layer(target)
            if here in LAYERS and there in LAYERS and LAYERS[there] > LAYERS[here]:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "imports against the layering kernels <- model <- platform <- jobs/cli:\n" + "\n".join(wrong)


def test_nothing_imports_jobs():
    wrong = [f"{name} imports {target}" for name, imported in IMPORTS.items() if _layer(name) != "jobs"
             for target in imported if _layer(target) == "jobs"]
    assert not wrong, "\n".join(wrong)


def test_kernels_and_model_import_neither_ray_nor_pydantic_and_only_kernels_import_triton():
    wrong = []
    for name, imported in IMPORTS.items():
        tops = {target.split(".")[0] for target in imported}
        if _layer(name) in ("kernels", "model"):
            wrong += [f"{name} imports {t}" for t in sorted(tops & {"ray", "pydantic", "pydantic_core"})]
        if _layer(name) != "kernels" and "triton" in tops:
            wrong.append(f"{name} imports triton")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    graph = {name: {t for t in imported if t in MODULES and t != name} for name, imported in IMPORTS.items()}
    cycles, state = [], {}  # state: 1 = on the current path, 2 = done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
