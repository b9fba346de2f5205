"""``dspark serve``: serve the OpenAI API on a local Ray cluster. One flag per
``ServeConfig`` field, over an optional YAML file."""

from __future__ import annotations

import argparse

from dspark.cluster.cli.common import Subparsers, add_flag

# NOTE: shown instead of the field's default where that default is computed (budget) or a
# machine-specific absolute path (target).
_SHOWN = {
    "budget": "cluster for a drafter with a confidence head, fixed otherwise",
    "target": "checkpoints/target",
}


def add_parser(sub: Subparsers) -> None:
    """One flag per ``ServeConfig`` field (``--max-num-seqs`` for ``max_num_seqs``), its
    help the field's docstring and its default the field's, so neither can drift. Every
    flag defaults to None so that ``serve_config`` can tell a given flag from the YAML's."""
    from dataclasses import MISSING, fields

    from dspark.cluster.config import ServeConfig

    srv = sub.add_parser("serve", help="serve the OpenAI API on a local Ray cluster")
    add_flag(srv, "--config", None, "YAML file of serve settings (flags override it)")
    docs = ServeConfig.field_docs()
    for f in fields(ServeConfig):
        if f.name == "api_keys":  # NOTE: one flag per key, repeatable
            add_flag(srv, "--api-key", None, docs[f.name] + " Repeat the flag for each key.",
                     dest="api_keys", action="append", shown="none")
            continue
        kind = {"int": int, "float": float, "int | None": int, "bool": _bool}.get(
            str(f.type), str)
        default = f.default if f.default is not MISSING else None
        help_text = docs.get(f.name, f.name.replace("_", " "))
        add_flag(srv, "--" + f.name.replace("_", "-"), None, help_text, dest=f.name, type=kind,
                 shown=_SHOWN.get(f.name, "none" if default is None else default))


def _bool(value: str) -> bool:
    """A yes/no flag value (true/false, yes/no, on/off, 1/0)."""
    word = value.strip().lower()
    if word in ("true", "yes", "on", "1"):
        return True
    if word in ("false", "no", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def serve_config(args: argparse.Namespace):
    """The ``ServeConfig`` of ``dspark serve``: the YAML file's, with every given flag over
    it."""
    from dataclasses import fields

    from dspark.cluster.config import ServeConfig

    base = ServeConfig.from_yaml(args.config).to_dict() if args.config else {}
    given = {f.name: getattr(args, f.name) for f in fields(ServeConfig)}
    base.update({k: v for k, v in given.items() if v is not None})
    return ServeConfig.from_dict(base)


def run(args: argparse.Namespace) -> int:
    from dspark.cluster.serve import main as serve_main

    return serve_main(serve_config(args))
