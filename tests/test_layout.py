"""The package layout holds: imports point one way, and the core never imports Ray.

Every import counts, also those inside functions (a lazy import is still a dependency): the test
reads the source, it does not import it.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "deployments", "hark")
# pipeline's subpackages by layer: a module may import its own subpackage and lower layers only.
LAYERS = {
    "core": 0,
    "audio": 1,
    "asr": 2,
    "diarization": 2,
    "transcription": 3,
    "service": 4,
    "streaming": 4,
    "tools": 5,
}
# Libraries the Ray-free core must not import (Serve adapters and the HTTP framework live in
# deployments/, Ray Data in hark/).
FORBIDDEN_IN_CORE = ("ray", "fastapi", "starlette")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> every module it imports (absolute names, as written)."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            name = module_name(path)
            imported = graph.setdefault(name, set())
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    imported.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom):
                    assert node.level == 0, f"{name}: relative import"
                    imported.add(node.module)
                    # `from pipeline.x import y` may name the submodule pipeline.x.y
                    imported.update(f"{node.module}.{alias.name}" for alias in node.names)
    return graph


def internal(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    return {m: {i for i in deps if i in graph and i != m} for m, deps in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def _package_modules(graph):
    # A package's __init__ is not an edge target worth counting: importing pipeline.asr.base
    # loads pipeline/asr/__init__.py, which imports nothing.
    return {m: {d for d in deps if not (REPO / d.replace(".", "/") / "__init__.py").exists()} for m, deps in graph.items()}


def test_no_import_cycles_between_modules():
    graph = _package_modules(internal(import_graph()))
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_cycles_between_subpackages():
    graph: dict[str, set[str]] = {}
    for module, deps in internal(import_graph()).items():
        here = ".".join(module.split(".")[:2])
        for dep in deps:
            there = ".".join(dep.split(".")[:2])
            if there != here and "." in here and "." in there:
                graph.setdefault(here, set()).add(there)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_core_layers_import_downwards_only():
    wrong = []
    for module, deps in internal(import_graph()).items():
        parts = module.split(".")
        if parts[0] != "pipeline" or len(parts) < 2:
            continue
        for dep in deps:
            dparts = dep.split(".")
            if dparts[0] in ("deployments", "hark"):
                wrong.append(f"{module} imports {dep} (outside the core)")
            elif len(dparts) > 1 and dparts[1] != parts[1] and LAYERS[dparts[1]] >= LAYERS[parts[1]]:
                wrong.append(f"{module} imports {dep} (layer {dparts[1]} is not below {parts[1]})")
    assert not wrong, "\n".join(sorted(wrong))


def test_every_core_subpackage_has_a_layer():
    found = {p.name for p in (REPO / "pipeline").iterdir() if (p / "__init__.py").exists()}
    assert found == set(LAYERS), found ^ set(LAYERS)
    flat = sorted(p.name for p in (REPO / "pipeline").glob("*.py") if p.name != "__init__.py")
    assert not flat, f"modules outside any layer: {flat}"


def test_the_core_never_imports_ray_or_the_web_framework():
    wrong = [
        f"{module} imports {dep}"
        for module, deps in import_graph().items()
        if module.startswith("pipeline")
        for dep in deps
        if dep.split(".")[0] in FORBIDDEN_IN_CORE
    ]
    assert not wrong, "\n".join(sorted(wrong))


def test_the_checks_can_fail():
    # The cycle finder and the graph reader see what they must.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    assert "ray" in {d.split(".")[0] for d in graph["deployments.asr"]}
    assert "pipeline.core.errors" in graph["pipeline.audio.decode"]
