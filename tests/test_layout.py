"""The tree shows the pipeline: imports run one way, test kits stay out of shipped code, files stay short.

Imports are read from the source (module level and inside functions alike), so a cycle hidden in a
function body counts too.
"""
import ast
from pathlib import Path

import pytest

import dsdiff

ROOT = Path(dsdiff.__file__).resolve().parent
MAX_LINES = 350
# what data/ (the bottom of the pipeline: real datasets, transforms, the DataModule) may import
DATA_MAY_IMPORT = {"data", "utils"}
# the top level holds one module per command (`python -m dsdiff.<command>`) beside the packages
COMMANDS = {"train", "generate", "evaluate", "score_labels", "pretrain", "prompts", "predict", "export"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports(name: str) -> set[str]:
    """The dsdiff modules that ``name`` imports (``from pkg import submodule`` names the submodule)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target.startswith("dsdiff") and target != name:
                out.add(target)
    return out


GRAPH = {name: imports(name) for name in MODULES}


def unit(name: str) -> str:
    """The top-level part of dsdiff a module belongs to: a subpackage or a top-level module."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "dsdiff"


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


def test_no_module_imports_a_module_that_imports_it_back():
    # a package's __init__ re-exporting its submodules is not a cycle of the pipeline: leave its edges out
    graph = {n: {t for t in ts if not (MODULES[n].name == "__init__.py" and t.startswith(n + "."))} for n, ts in GRAPH.items()}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_packages_import_each_other_one_way_only():
    graph: dict[str, set[str]] = {}
    for name, targets in GRAPH.items():
        graph.setdefault(unit(name), set()).update(unit(t) for t in targets if unit(t) not in (unit(name), "dsdiff"))
    cycle = find_cycle(graph)
    assert cycle is None, f"packages import each other in a cycle: {' -> '.join(cycle)}"


def test_data_imports_nothing_above_it():
    upward = {f"{n} imports {t}" for n, ts in GRAPH.items() if unit(n) == "data" for t in ts if unit(t) not in DATA_MAY_IMPORT}
    assert not upward, sorted(upward)


def test_utils_is_the_ground_floor():
    upward = {f"{n} imports {t}" for n, ts in GRAPH.items() if unit(n) == "utils" for t in ts if unit(t) != "utils"}
    assert not upward, sorted(upward)


def test_the_top_level_holds_only_commands_and_packages():
    modules = {p.stem for p in ROOT.glob("*.py") if p.name != "__init__.py"}
    assert modules == COMMANDS, f"top-level modules that are not commands: {sorted(modules - COMMANDS)}"
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert {"chain", "data", "diffusion", "models", "prompting", "synthetic", "utils", "viz"} <= packages


def test_no_shipped_module_imports_a_test_kit():
    kits = {n for n in MODULES if unit(n) == "testing"}
    assert kits, "dsdiff.testing is where the test kits live"
    shipped = {f"{n} imports {t}" for n, ts in GRAPH.items() if unit(n) != "testing" for t in ts if t in kits}
    assert not shipped, sorted(shipped)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_short(name):
    lines = len(MODULES[name].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name]} has {lines} lines (at most {MAX_LINES}: split it by concern)"


def test_the_layout_test_sees_the_imports_it_checks():
    # guard against a parser that finds nothing (every check above would pass vacuously)
    assert "dsdiff.data.classes" in GRAPH["dsdiff.data.voc"]
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
