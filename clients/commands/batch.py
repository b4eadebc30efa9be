"""`genserve batch MODEL --num 10000 --shard-size 500 --out DIR --concurrency 8`: a resumable generation job."""

from __future__ import annotations

import argparse

from genserve.clients.verbs import CommandError, Verb

from .connection import add_server_arguments, client_options, reports_server_errors


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a served model that can sample")
    parser.add_argument("--num", type=int, required=True, help="images in the job")
    parser.add_argument("--shard-size", type=int, default=500, help="images per NPZ shard (one request each)")
    parser.add_argument("--out", required=True, help="the job folder (rerun the same command to resume)")
    parser.add_argument("--concurrency", type=int, default=8, help="shards requested at once")
    parser.add_argument("--seed", type=int, help="the job's seed (default: a random one, recorded in job.json)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--label", type=int, help="one label for every image (default: image i gets i mod classes)")
    parser.add_argument("--png", action="store_true",
                        help="also write each image as a PNG (an audio model's clips as WAV files) under shard-NNNNN/")
    parser.add_argument("--attempts", type=int, default=3, help="tries per shard before it is reported failed")
    parser.add_argument("--no-progress", action="store_true")
    add_server_arguments(parser)


@reports_server_errors
def run(args: argparse.Namespace) -> int:
    import asyncio
    import time
    from pathlib import Path

    from tqdm import tqdm

    from genserve.clients import AsyncClient
    from genserve.clients.batch import BatchJob, new_seed, open_job, run_job

    if args.concurrency < 1 or args.attempts < 1:
        raise CommandError(f"--concurrency and --attempts must be >= 1, got {args.concurrency}, {args.attempts}")
    folder = Path(args.out)
    job = BatchJob(args.model, args.num, args.shard_size, args.seed if args.seed is not None else new_seed(),
                   args.temperature, args.label, args.png)
    manifest, todo = open_job(folder, job, resume_seed=args.seed is None)
    job = manifest.job
    done = job.num - sum(len(job.shard_range(k)) for k in todo)
    if done:
        print(f"resuming {folder}: {len(manifest.shards)} of {job.num_shards} shards verified, {len(todo)} to do")
    began = time.perf_counter()
    bar = tqdm(total=job.num, initial=done, unit="img", desc=job.model, disable=args.no_progress)

    async def main():
        async with AsyncClient(args.server, **client_options(args)) as client:
            return await run_job(client, folder, manifest, todo, args.concurrency, args.attempts, bar.update)

    failed = asyncio.run(main())
    bar.close()
    made = job.num - done - sum(len(job.shard_range(int(k))) for k in failed)
    print(f"{made} images in {time.perf_counter() - began:.1f} s; {len(manifest.shards)} of {job.num_shards} shards "
          f"done (seed {job.seed}) → {folder}")
    if failed:
        for k, error in sorted(failed.items(), key=lambda kv: int(kv[0])):
            print(f"shard {k} failed after {args.attempts} attempts: {error}")
        raise CommandError(f"{len(failed)} shards failed; rerun the same command to retry them")
    return 0


VERB = Verb(
    help="generate many samples as resumable, verifiable NPZ shards",
    description="Sample --num images of MODEL from a genserve server into --out: shard k is one request for "
    "samples k*shard_size... of the job's seed, saved as shard-NNNNN.npz (images, indices, labels) with its "
    "sha256 in job.json. Rerunning the same command resumes: verified shards are skipped, partial or damaged "
    "ones redone. Failing shards are retried --attempts times, then reported (exit status 2).",
    add_arguments=add_arguments,
    run=run,
)
