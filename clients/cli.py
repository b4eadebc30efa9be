"""The `genserve` command: one entry point fronting every verb.

Verbs are plugins registered under the entry-point group `genserve.verbs` (pyproject.toml),
so this dispatcher knows no model or server code: it lists the group, builds a sub-parser per
verb, and calls the chosen verb's `run`.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points

from .verbs import CommandError, Verb

VERB_GROUP = "genserve.verbs"


def load_verbs() -> dict[str, Verb]:
    verbs = {}
    for entry in entry_points(group=VERB_GROUP):
        verb = entry.load()
        if not isinstance(verb, Verb):
            raise TypeError(f"entry point {entry.name} = {entry.value} is not a genserve Verb")
        verbs[entry.name] = verb
    return dict(sorted(verbs.items()))


def build_parser(verbs: dict[str, Verb]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genserve",
        description="Train, export, serve and query deep generative models.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name, verb in verbs.items():
        verb_parser = sub.add_parser(
            name, help=verb.help, description=verb.description or verb.help,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        verb.add_arguments(verb_parser)
        verb_parser.set_defaults(run=verb.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    verbs = load_verbs()
    args = build_parser(verbs).parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (CommandError, ValueError, FileNotFoundError, NotImplementedError) as error:
        # User mistakes (bad flags, missing files, unsupported capability): one readable line.
        print(f"genserve {args.verb}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"genserve {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
