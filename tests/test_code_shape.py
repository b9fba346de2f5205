"""Small files, small functions: no Python source over 500 lines, no function over 60.

A function's length is ``end_lineno - lineno + 1`` of its ``def`` (decorators excluded);
nested functions and methods count on their own. The files checked are the repository's
Python files that git tracks or would track (untracked but not ignored), so a new file is
checked before it is committed.
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60

PENDING: set[str] = set()
"""Files excused while being split (none now)."""


def _python_files() -> list[str]:
    """Repo-relative paths of tracked and untracked-but-not-ignored ``*.py`` files."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        paths = sorted(set(out.splitlines()))
    except (OSError, subprocess.CalledProcessError):  # not a git checkout
        paths = sorted(
            p.relative_to(REPO_ROOT).as_posix()
            for p in REPO_ROOT.rglob("*.py")
            if not any(part.startswith(".") for part in p.relative_to(REPO_ROOT).parts)
        )
    # A tracked file deleted in the working tree is not there to check.
    return [p for p in paths if (REPO_ROOT / p).is_file()]


def shape_offenders(path: str, source: str) -> list[str]:
    """One line per rule ``source`` breaks, each naming ``path`` and the length found."""
    offenders = []
    num_lines = len(source.splitlines())
    if num_lines > MAX_FILE_LINES:
        offenders.append(f"{path}: {num_lines} lines (max {MAX_FILE_LINES})")
    for node in ast.walk(ast.parse(source, filename=path)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                offenders.append(
                    f"{path}:{node.lineno}: function {node.name} is {length} lines "
                    f"(max {MAX_FUNCTION_LINES})"
                )
    return offenders


def test_no_file_or_function_over_the_limits():
    paths = _python_files()
    assert len(paths) > 50, f"found only {len(paths)} Python files under {REPO_ROOT}"
    offenders = []
    for path in paths:
        if path not in PENDING:
            offenders += shape_offenders(path, (REPO_ROOT / path).read_text(encoding="utf-8"))
    assert not offenders, (
        "split these (files <= 500 lines, functions <= 60 lines):\n  " + "\n  ".join(offenders)
    )


def test_checker_flags_a_long_file_and_a_long_function():
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    long_function = f"@decorator\ndef f():\n{body}"  # def line + 60 body lines = 61
    assert shape_offenders("a.py", long_function) == ["a.py:2: function f is 61 lines (max 60)"]
    just_fits = f"def f():\n{body[: body.rindex('    x')]}"
    assert shape_offenders("b.py", just_fits) == []
    long_file = "x = 0\n" * (MAX_FILE_LINES + 1)
    assert shape_offenders("c.py", long_file) == ["c.py: 501 lines (max 500)"]
    assert shape_offenders("d.py", "x = 0\n" * MAX_FILE_LINES) == []


def test_the_engine_class_stays_under_300_lines():
    """The step loop reads like the algorithm; policies live beside it, not in it."""
    tree = ast.parse((REPO_ROOT / "workers" / "engine.py").read_text(encoding="utf-8"))
    engine = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Engine")
    assert engine.end_lineno - engine.lineno + 1 < 300
