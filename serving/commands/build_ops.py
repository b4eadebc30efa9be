"""`genserve build-ops`: compile the fused sampling operators (serving/fused/csrc) for this machine.

`make setup` runs it; nothing else ever compiles. On a machine with a CUDA device and nvcc it also
builds the CUDA C++ kernels' library. The library lands beside the package
(serving/fused/_build) with the sha256 of the sources it was built from; servers load it only
when that matches, and otherwise sample with the exported step graphs, saying why.
"""

from __future__ import annotations

import argparse

from genserve.clients.verbs import CommandError, Verb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true", help="show the compiler's commands and output")
    parser.add_argument("--check", action="store_true", help="only say whether a current build loads; exit 1 if not")


def run(args: argparse.Namespace) -> int:
    import time

    from genserve.serving import fused

    if args.check:
        status = fused.load_ops()
        print(status.reason)
        return 0 if status else 1
    print(f"building {', '.join(fused.SOURCES)} with {' '.join(fused.CFLAGS)} (about 35 s) ...", flush=True)
    if fused.builds_cuda():
        print(f"and, for this GPU, {', '.join(fused.CUDA_SOURCES)} with nvcc {' '.join(fused.CUDA_CFLAGS)} ...",
              flush=True)
    start = time.monotonic()
    try:
        path = fused.build(verbose=args.verbose)
    except (RuntimeError, OSError) as error:  # no compiler, no ninja, a compile error
        raise CommandError(f"building the fused operators failed: {error}") from None
    print(f"built {path} in {time.monotonic() - start:.0f} s")
    return 0


VERB = Verb(
    help="compile the fused sampling operators for this machine (make setup runs it)",
    add_arguments=add_arguments,
    run=run,
    description=__doc__,
)
