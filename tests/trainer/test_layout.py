"""The trainer package's shape: no import circle, no imports inside functions to dodge one, no test
switches in shipped code, ``main()`` an outline of the recipe."""
from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TRAINER = REPO / "trainer"


def _trainer_imports(path: Path) -> tuple[set[str], list[str]]:
    """(trainer modules imported at module level, those imported inside a function) of one file."""
    tree = ast.parse(path.read_text())
    top, nested = set(), []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "trainer":
                names = [alias.name for alias in node.names]
            elif node.module.startswith("trainer."):
                names = [node.module.split(".")[1]]
        elif isinstance(node, ast.Import):
            names = [alias.name.split(".")[1] for alias in node.names if alias.name.startswith("trainer.")]
        for name in names:
            (top.add(name) if node in tree.body else nested.append(name))
    return top, nested


def test_no_import_circle_and_no_function_level_trainer_imports() -> None:
    graph = {}
    for path in TRAINER.glob("*.py"):
        top, nested = _trainer_imports(path)
        assert not nested, f"{path.name} imports {nested} inside a function"
        graph[path.stem] = top

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for dep in graph.get(start, ()):
            if dep == target or (dep not in seen and (seen.add(dep) or reaches(dep, target, seen))):
                return True
        return False

    circles = [name for name in graph if reaches(name, name, set())]
    assert not circles, f"import circles through {circles}"
    # The error module is the root every stopping module imports.
    for name in ("preflight", "data", "caching", "checkpointing"):
        assert "errors" in graph[name], name
    assert graph["errors"] == set()


def test_shipped_code_reads_no_test_switch_and_imports_no_tests() -> None:
    for package in ("trainer", "npu_kernels"):
        for path in (REPO / package).rglob("*.py"):
            text = path.read_text()
            assert "NPU_KERNELS_TEST" not in text, path
            assert not re.search(r"^\s*(from|import) tests\b", text, re.M), path
    assert not (TRAINER / "testing_hooks.py").exists()


def test_main_is_an_outline() -> None:
    from trainer import sdxl_lora

    lines = inspect.getsource(sdxl_lora.main).splitlines()
    assert len(lines) <= 220, f"main() has {len(lines)} lines"
    assert "def " not in "\n".join(lines[1:]), "main() defines closures"
