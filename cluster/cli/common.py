"""What the subcommand modules share: the default checkpoint paths, flag helpers whose help
states the default, the record that ties flags to a config dataclass, and the command line
written into result files. Light on purpose: ``dspark --help`` imports it."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TARGET = REPO_ROOT / "checkpoints" / "target"
DEFAULT_DRAFTERS = REPO_ROOT / "checkpoints" / "drafters"

Subparsers = argparse._SubParsersAction


def add_flag(
    parser: argparse.ArgumentParser, flag: str, default, help: str, *, shown=None, **kwargs
) -> argparse.Action:
    """``flag`` with ``default``, its help ending in ``(default: ...)`` built from that same
    value so the two cannot drift. ``shown`` replaces the value in the help where the value
    would mislead (a machine-specific absolute path, a default computed later)."""
    shown = default if shown is None else shown
    text = f"{help} (default: {'none' if shown is None else shown})"
    return parser.add_argument(flag, default=default, help=text.replace("%", "%%"), **kwargs)


def add_switch(parser: argparse.ArgumentParser, flag: str, help: str) -> argparse.Action:
    """An on/off ``flag``, off unless given."""
    return parser.add_argument(flag, action="store_true", help=f"{help} (default: off)")


@dataclass(frozen=True)
class Mirror:
    """The flags of one command that carry fields of one config dataclass: a flag whose dest
    is a field's name (or is renamed to one) must default to the field's default and quote
    the field's docstring in its help; ``tests/cluster/test_cli.py`` checks every mirror.
    The dataclass is named by import path, so building the parser never imports it (nor the
    torch behind it)."""

    command: tuple[str, ...]
    """The subcommand path, e.g. ``("train", "target")``."""
    config: str
    """``module:Class`` of the dataclass."""
    renamed: Mapping[str, str] = field(default_factory=dict)
    """Flag dest -> field name, where they differ."""
    own_defaults: frozenset[str] = frozenset()
    """Fields whose CLI default deliberately differs from the dataclass's (say why where
    the mirror is declared)."""


def recorded_command(*words: str) -> str:
    """The command line a result file records: ``dspark``, the subcommand path ``words``,
    then the rest of ``sys.argv`` when this process was started as that subcommand (a
    programmatic ``main([...])`` call records the bare subcommand)."""
    n = len(words)
    rest = sys.argv[1 + n:] if sys.argv[1:1 + n] == list(words) else []
    return shlex.join(["dspark", *words, *rest])
