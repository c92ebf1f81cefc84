"""Write docs/support_matrix.md: every model family x adapter method, checked on tiny random models.

Run from the project root: ``python scripts/write_support_matrix.py``. The checks are the ones
``tests/test_adapters.py::test_support_matrix`` runs, which then compares its table with this file,
so the document can only say what the current code does.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the family definitions live with the tests
    from test_adapters import MATRIX_FILE, matrix_rows, render_matrix

    with tempfile.TemporaryDirectory() as tmp:
        text = render_matrix(matrix_rows(Path(tmp)))
    MATRIX_FILE.parent.mkdir(exist_ok=True)
    MATRIX_FILE.write_text(text, encoding="utf-8")
    print(f"wrote {MATRIX_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
