"""`genserve make-speech`: rebuilds the spoken-digit corpus with espeak-ng and checks it against the record."""

from __future__ import annotations

import argparse

from genserve.clients.verbs import CommandError, Verb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help="file to write (default: the committed corpus, replaced only if identical)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from genserve.export.speech import CORPUS_DIGEST, CORPUS_FILE, CorpusSpec, build_corpus, digest, write_corpus

    spec = CorpusSpec()
    try:
        arrays = build_corpus(spec, progress=not args.no_progress)
    except RuntimeError as error:  # espeak-ng missing
        raise CommandError(str(error)) from None
    made = digest(arrays)
    seconds = arrays["audio"].shape[0] * spec.length / spec.sample_rate
    print(f"{arrays['audio'].shape[0]} clips, {seconds:.0f} s of audio at {spec.sample_rate} Hz, digest {made}")
    if args.out:
        write_corpus(Path(args.out), arrays)
        print(f"wrote {args.out}")
    if made != CORPUS_DIGEST:
        raise CommandError(f"the digest differs from the recorded {CORPUS_DIGEST} (another espeak-ng or scipy "
                           "version?): training on it would not reproduce the shipped model"
                           + ("" if args.out else f"; {CORPUS_FILE} left as it was"))
    if not args.out:
        write_corpus(CORPUS_FILE, arrays)
        print(f"identical to the recorded corpus; rewrote {CORPUS_FILE}")
    return 0


VERB = Verb(
    help="rebuild the spoken-digit corpus (needs espeak-ng)",
    description="Synthesise the ten English digits with espeak-ng in every voice, speed and pitch of the corpus "
    "spec, resample to 8 kHz mu-law clips and write them; checks the result against the recorded digest.",
    add_arguments=add_arguments,
    run=run,
)
