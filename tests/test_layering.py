"""The import layering of STYLE.md: lower layers never import higher ones.

errors < math (schedules, diffusion, losses)
< algorithms (likelihood, samplers, oracle, guidance, editing)
< components (nets, data, metrics, viz: none imports another)
< assembly (config, checkpoint, train, evaluate, edit, cli).
"""

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ddpm"
LAYERS = {
    "errors": 0,
    "schedules": 1, "diffusion": 1, "losses": 1,
    "likelihood": 2, "samplers": 2, "oracle": 2, "objective": 2, "guidance": 2, "editing": 2,
    "nets": 3, "data": 3, "metrics": 3, "viz": 3,
    "config": 4, "checkpoint": 4, "distributed": 4, "runs": 4, "train": 4, "evaluate": 4,
    "devices": 4, "train_state": 4, "trainlog": 4, "interop": 4,
    "cli": 4, "edit": 4, "__main__": 4, "__init__": 4,
}  # fmt: skip
MATH = {"schedules", "diffusion", "losses"}


def unit_of(path: Path) -> str:
    """The layer unit a file belongs to: its top-level module or subpackage under ddpm/."""
    return path.relative_to(SRC).parts[0].removesuffix(".py")


def imports_of(path: Path) -> tuple[set[str], set[str]]:
    """(ddpm units imported, top-level third-party/stdlib modules imported) by a file."""
    tree = ast.parse(path.read_text())
    ours, others = set(), set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            base = path.parent.relative_to(SRC).parts
            target = base[: len(base) - node.level + 1] + ((node.module,) if node.module else ())
            ours.add(target[0].removesuffix(".py") if target else unit_of(path))
        for name in names:
            parts = name.split(".")
            if parts[0] == "ddpm":
                if len(parts) > 1:
                    ours.add(parts[1])
            else:
                others.add(parts[0])
    return ours, others


FILES = sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_module_imports_only_lower_layers(path):
    unit = unit_of(path)
    assert unit in LAYERS, f"{unit} has no layer: add it to LAYERS (and to STYLE.md's picture)"
    ours, _ = imports_of(path)
    for other in ours - {unit}:
        assert LAYERS[other] <= LAYERS[unit], f"{unit} (layer {LAYERS[unit]}) imports {other}"
        if LAYERS[unit] == 3:
            assert LAYERS[other] < 3, f"component {unit} imports component {other}"


@pytest.mark.parametrize("path", [p for p in FILES if unit_of(p) in MATH], ids=lambda p: p.name)
def test_math_imports_only_torch_and_the_standard_library(path):
    ours, others = imports_of(path)
    assert ours <= MATH | {"errors"}
    assert others <= {"torch", "__future__"} | set(sys.stdlib_module_names)


def test_networks_know_nothing_of_the_diffusion_math():
    for path in (SRC / "nets").rglob("*.py"):
        ours, _ = imports_of(path)
        assert ours <= {"nets", "errors"}, path
