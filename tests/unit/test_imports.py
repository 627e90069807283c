"""omni_core's import graph has no cycles and no ComfyUI import; family modules import no accelerator."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "omni_core"
COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "nodes", "server", "execution"}
ACCELERATOR_PACKAGES = ("omni_core.cache", "omni_core.quant", "omni_core.offload", "omni_core.parallel")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(omni_core modules imported anywhere in the file, top-level names of other imports)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    inside, outside = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                (inside if alias.name.startswith("omni_core") else outside).add(
                    alias.name if alias.name.startswith("omni_core") else alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module
            if not base.startswith("omni_core"):
                outside.add(base.split(".")[0])
                continue
            for alias in node.names:
                inside.add(f"{base}.{alias.name}" if _is_module(f"{base}.{alias.name}") else base)
    return inside, outside


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in CORE.rglob("*.py"):
        inside, outside = _imports(path)
        graph[_module_name(path)] = inside
        assert not outside & COMFY_MODULES, f"{path.relative_to(ROOT)} imports ComfyUI ({outside & COMFY_MODULES})"
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycles_and_no_comfyui_in_omni_core():
    graph = _graph()
    assert len(graph) > 30, "the walker found the modules"
    assert "omni_core.families.facts" in graph["omni_core.families.base"], "edges are resolved"
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def _package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The module graph seen by package: omni_core's subpackages (cache, quant, weights, ...) are one node each,
    its top-level modules one node each."""
    def package(module: str) -> str:
        parts = module.split(".")
        return ".".join(parts[:2]) if len(parts) > 2 or (ROOT / "omni_core" / parts[-1]).is_dir() else module

    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        packages.setdefault(package(module), set()).update(package(t) for t in targets if package(t) != package(module))
    return packages


def test_no_import_cycles_between_packages():
    packages = _package_graph(_graph())
    assert {"omni_core.weights", "omni_core.quant", "omni_core.parallel", "omni_core.families"} <= set(packages)
    assert "omni_core.weights" in packages["omni_core.quant"], "edges are resolved to packages"
    assert _cycle(packages) is None, " -> ".join(_cycle(packages))


def test_the_walker_finds_a_cycle_when_there_is_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_families_import_no_accelerator():
    graph = _graph()
    for module, targets in graph.items():
        if module.startswith("omni_core.families"):
            bad = [t for t in targets if t.startswith(ACCELERATOR_PACKAGES)]
            assert not bad, f"{module} imports accelerators {bad}: families declare facts, accelerators read them"
