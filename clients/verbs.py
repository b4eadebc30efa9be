"""What a `genserve` sub-command is: a name's help text, its arguments, and what it runs.

Verb modules are imported only to build the parser, so they must import heavy libraries
(torch, grpc) inside `run`, keeping `genserve --help` fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Verb:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str = ""


class CommandError(Exception):
    """A failure the user can act on: printed as one line, exit status 2, no traceback."""
