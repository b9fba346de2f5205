"""Walks the running interpreter's standard library: functions, classes and their docstrings.

Everything here comes from the Python installation itself, so every fresh machine with the
same interpreter yields the same items in the same order.
"""

from __future__ import annotations

import ast
import functools
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_SKIP_PARTS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "site-packages",
        "__pycache__",
        "turtledemo",
        "ensurepip",
        "lib2to3",
        "pydoc_data",
        "encodings",
        "__phello__",
        "config-3.11-x86_64-linux-gnu",
    }
)
FORBIDDEN = ("<mask>", "<|", "|>")


@dataclass(frozen=True)
class SourceItem:
    """One documented definition of the standard library."""

    module: str  # dotted module name, e.g. "os.path"
    qualname: str  # "join" or "Class.method"
    kind: str  # "function", "method" or "class" or "module"
    doc: str  # first paragraph of the docstring, whitespace-normalised
    node: ast.AST | None  # the definition (None for modules)
    full_doc: str = ""  # the whole docstring, as written


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def iter_stdlib_files() -> Iterator[tuple[str, Path]]:
    root = stdlib_root()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(p in _SKIP_PARTS or p.startswith("test_") for p in rel.parts):
            continue
        if rel.name.startswith(("test_", "_test")):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not parts:
            continue
        yield ".".join(parts), path


def clean_paragraph(text: str) -> str:
    """First paragraph of a docstring, on one line, ASCII-only ('' if unusable)."""
    return clean_paragraphs(text)[0] if text.strip() else ""


def clean_paragraphs(text: str) -> list[str]:
    """Every paragraph of a docstring, each on one line; unusable ones become ''."""
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"')
    text = text.replace("\u201d", '"').replace("\u2014", " - ").replace("\u2013", "-")
    out = []
    for para in re.split(r"\n\s*\n", text.strip()):
        indented = any(line.startswith("    ") for line in para.split("\n")[1:])
        para = re.sub(r"\s+", " ", para).strip()
        if indented or not para.isascii() or any(f in para for f in FORBIDDEN):
            para = ""
        out.append(para)
    return out or [""]


def iter_documented(include_modules: bool = True) -> Iterator[SourceItem]:
    """Every documented module, class, function and method, in a fixed order (the module
    docstrings left out without ``include_modules``)."""
    for item in _documented():
        if include_modules or item.kind != "module":
            yield item


@functools.cache
def _documented() -> tuple[SourceItem, ...]:
    """The walk of the standard library, parsed once per process: the code and the chat
    domains both read it, and a corpus built again (another seed) reads it again."""
    return tuple(_walk())


def _walk() -> Iterator[SourceItem]:
    for module, path in iter_stdlib_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        full = ast.get_docstring(tree) or ""
        doc = clean_paragraph(full)
        if doc:
            yield SourceItem(module, module.rsplit(".", 1)[-1], "module", doc, None, full)
        for node in tree.body:
            yield from _items_of(module, node, prefix="")


def _items_of(module: str, node: ast.AST, prefix: str) -> Iterator[SourceItem]:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        full = ast.get_docstring(node) or ""
        doc = clean_paragraph(full)
        if doc and not node.name.startswith("__"):
            kind = "method" if prefix else "function"
            yield SourceItem(module, prefix + node.name, kind, doc, node, full)
    elif isinstance(node, ast.ClassDef) and not prefix:
        full = ast.get_docstring(node) or ""
        doc = clean_paragraph(full)
        if doc:
            yield SourceItem(module, node.name, "class", doc, node, full)
        for child in node.body:
            yield from _items_of(module, child, prefix=node.name + ".")
