"""lmtune.evaluate must not depend on the training stack or the CLI (STYLE.md §1)."""

import ast
from pathlib import Path

import pytest

EVALUATE = Path(__file__).parents[1] / "lmtune" / "evaluate"
FORBIDDEN = ("lmtune.train", "lmtune.cli")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            # "from lmtune import train" names the module in the alias.
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", sorted(EVALUATE.glob("*.py")), ids=lambda p: p.name)
def test_evaluate_does_not_import_train_or_cli(path: Path) -> None:
    bad = [name for name in imported_modules(path) if name.startswith(FORBIDDEN)]
    assert bad == [], f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", sorted(EVALUATE.glob("*.py")), ids=lambda p: p.name)
def test_evaluate_files_stay_small(path: Path) -> None:
    assert len(path.read_text(encoding="utf-8").splitlines()) <= 400
