"""The `action3d` command. It parses paths and overrides, then calls library functions: no logic lives here."""

from __future__ import annotations

import argparse
import sys

from action3d.errors import Action3dError


def _cmd_models(args: argparse.Namespace) -> None:
    from action3d.models.summary import format_model_table, model_table

    rows = [r for r in model_table(progress=True) if not args.filter or args.filter in r["name"]]
    print(format_model_table(rows))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="action3d", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="list every registered 3D CNN with its size and cost")
    models.add_argument("filter", nargs="?", default=None, help="only names containing this text")
    models.set_defaults(func=_cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        return 130
    except Action3dError as err:  # bad input: one message a person can act on, no traceback
        print(f"action3d: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
