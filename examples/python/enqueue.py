#!/usr/bin/env python3
"""Enqueue jobs on a jobbroker: one job from the command line, or a batch with one payload per line of stdin.

    enqueue.py --queue ebooks --kind render '{"text": "page one"}'
    seq 1 200 | sed 's/.*/{"text": "page &"}/' | enqueue.py --queue ebooks --kind render --batch

Prints `<job id> created` (or `<job id> existing` when the idempotency key matched an earlier job) per job, in
input order. Exit code 2 when the broker refuses the input (every bad field is named on stderr), 1 on other errors.
"""

import argparse
import datetime
import sys
import uuid

import grpc

from broker_client import DEFAULT_BROKER, connect, describe_error, job_pb, pb

# The broker takes at most 1000 jobs per Enqueue by default; each call is stored atomically (all or none).
BATCH = 1000


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", default=DEFAULT_BROKER, help="host:port (default %(default)s, $JOBBROKER_BROKER)")
    parser.add_argument("--queue", required=True)
    parser.add_argument("--kind", required=True, help="which handler runs the job")
    parser.add_argument("--priority", type=int, default=0, help="higher runs first (-1000..1000)")
    parser.add_argument("--delay", type=float, default=0.0, metavar="SECONDS", help="run no sooner than this")
    parser.add_argument("--max-attempts", type=int, default=0, help="0: the broker's default")
    parser.add_argument("--lease-ttl", type=float, default=0.0, metavar="SECONDS", help="0: the broker's default")
    parser.add_argument(
        "--key",
        help="idempotency key (batch: KEY-1, KEY-2, … per line); enqueueing it again returns the same job. "
        "Default: a random key, so the channel's retries never enqueue a job twice",
    )
    parser.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE", help="metadata; repeatable")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS", help="deadline of each call")
    parser.add_argument("--batch", action="store_true", help="read one payload per line from stdin")
    parser.add_argument("payload", nargs="?", help="the job's payload (single job)")
    args = parser.parse_args()
    if args.batch == (args.payload is not None):
        parser.error("give either a PAYLOAD or --batch (payloads on stdin)")
    for entry in args.meta:
        if "=" not in entry:
            parser.error(f"--meta {entry!r}: expected KEY=VALUE")
    return args


def job_spec(args: argparse.Namespace, payload: str, key: str) -> job_pb.JobSpec:
    spec = job_pb.JobSpec(
        queue=args.queue,
        kind=args.kind,
        payload=payload.encode(),
        priority=args.priority,
        max_attempts=args.max_attempts,
        idempotency_key=key,
        metadata=dict(entry.split("=", 1) for entry in args.meta),
    )
    if args.delay > 0:
        spec.run_at.FromDatetime(datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=args.delay))
    if args.lease_ttl > 0:
        spec.lease_ttl.FromTimedelta(datetime.timedelta(seconds=args.lease_ttl))
    return spec


def main() -> int:
    args = parse_args()
    payloads = [line.rstrip("\n") for line in sys.stdin] if args.batch else [args.payload]
    base_key = args.key or uuid.uuid4().hex
    keys = [f"{base_key}-{n}" for n in range(1, len(payloads) + 1)] if args.batch else [base_key]
    specs = [job_spec(args, payload, key) for payload, key in zip(payloads, keys)]
    stub = connect(args.broker)
    for start in range(0, len(specs), BATCH):
        chunk = specs[start : start + BATCH]
        try:
            reply = stub.Enqueue(pb.EnqueueRequest(jobs=chunk), timeout=args.timeout)
        except grpc.RpcError as error:
            print(describe_error(error), file=sys.stderr)
            if start > 0:
                print(f"the first {start} jobs were enqueued (listed above)", file=sys.stderr)
            return 2 if error.code() == grpc.StatusCode.INVALID_ARGUMENT else 1
        for job in reply.jobs:
            print(job.id, "created" if job.created else "existing", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
