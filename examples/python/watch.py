#!/usr/bin/env python3
"""Wait for a job's result through WatchJob, printing each change the broker reports.

    watch.py 0190f3c2-…

Changes go to stderr (`LEASED attempt 1 by worker-7: 40% rendering`); the result of a SUCCEEDED job goes to stdout
and the exit code is 0. A FAILED or CANCELLED job exits 1 with its last error, an unknown job 1, no end before the
deadline 3. When the broker becomes unreachable the watch is opened again (it starts with the current state, so no
outcome is missed).
"""

import argparse
import random
import sys
import time

import grpc

from broker_client import DEFAULT_BROKER, connect, describe_error, job_pb, pb

TERMINAL = {job_pb.JOB_STATE_SUCCEEDED, job_pb.JOB_STATE_FAILED, job_pb.JOB_STATE_CANCELLED}


def describe(job: job_pb.Job) -> str:
    line = f"{job_pb.JobState.Name(job.state).removeprefix('JOB_STATE_')} attempt {job.attempt}"
    if job.state == job_pb.JOB_STATE_LEASED:
        line += f" by {job.worker_id}"
    if job.HasField("progress"):
        line += f": {job.progress.percent}% {job.progress.message}"
    if job.last_error:
        line += f" (last error: {job.last_error})"
    return line


def watch(stub, job_id: str, deadline: float) -> job_pb.Job:
    """The job once terminal. Reopens the stream on UNAVAILABLE (jittered backoff); raises other errors."""
    backoff = 0.2
    while True:
        try:
            # The deadline covers the whole stream: a watch must not hang forever on a job nobody runs.
            for reply in stub.WatchJob(pb.WatchJobRequest(id=job_id), timeout=max(deadline - time.monotonic(), 0)):
                print(describe(reply.job), file=sys.stderr, flush=True)
                if reply.job.state in TERMINAL:
                    return reply.job
                backoff = 0.2
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() + backoff > deadline:
                raise
            print(f"broker unavailable ({error.details()}); watching again", file=sys.stderr)
        time.sleep(backoff * random.uniform(0.5, 1.0))
        backoff = min(backoff * 2, 5.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", default=DEFAULT_BROKER, help="host:port (default %(default)s, $JOBBROKER_BROKER)")
    parser.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS", help="give up after this long")
    parser.add_argument("job_id")
    args = parser.parse_args()
    try:
        job = watch(connect(args.broker), args.job_id, time.monotonic() + args.timeout)
    except grpc.RpcError as error:
        print(describe_error(error), file=sys.stderr)
        return 3 if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED else 1
    if job.state != job_pb.JOB_STATE_SUCCEEDED:
        return 1
    sys.stdout.buffer.write(job.result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
