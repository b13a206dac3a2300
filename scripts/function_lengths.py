"""The longest functions of the package, in lines (``def`` to its last line, docstring included):

    python scripts/function_lengths.py [--top 10] [--root cptlab]

The house rule: none is longer than ``LIMIT`` lines unless the line before its ``def`` is a comment that
says why (``tests/test_project.py`` checks it).
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

LIMIT = 60


def function_lengths(root: Path) -> list[tuple[int, str, bool]]:
    """(lines, "path:line name", excused) of every function under ``root``, longest first; ``excused``:
    the line before the ``def`` (or its first decorator) is a comment."""
    rows = []
    for path in sorted(root.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                excused = first >= 2 and lines[first - 2].strip().startswith("#")
                rows.append((node.end_lineno - node.lineno + 1, f"{path}:{node.lineno} {node.name}", excused))
    return sorted(rows, reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--root", type=Path, default=Path("cptlab"))
    args = parser.parse_args()
    for n, where, excused in function_lengths(args.root)[: args.top]:
        print(f"{n:4d}  {where}" + ("  (excused by a comment)" if excused else ""))


if __name__ == "__main__":
    main()
