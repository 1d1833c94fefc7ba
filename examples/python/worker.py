#!/usr/bin/env python3
"""A jobbroker worker in plain Python: holds a Lease stream, runs each assigned job in a thread, heartbeats all its
leases from one background thread (with progress), and completes each job fenced by its lease.

    worker.py --queue ebooks --capacity 4

The example handler (`handle`, replace it with your work) takes a JSON payload {"text": "...", "seconds": 2}, works
for `seconds` in ten steps reporting progress, and returns {"worker": <worker id>, "text": <TEXT upper-cased>}.

- A job is stopped when the broker cancels it (CancelNotice, or `cancel_requested` on a heartbeat): it is completed
  as a non-retryable failure and ends CANCELLED.
- A job whose lease is lost (heartbeat says `active=false`, or Complete answers ABORTED) is dropped silently:
  another worker has it now.
- When the broker is unreachable the stream is reopened with backoff, naming the leases still running.
- SIGTERM or SIGINT stops taking jobs, releases the running ones (back to the queue at once, attempt not used) and
  exits 0.
"""

import argparse
import json
import logging
import queue
import random
import signal
import socket
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc

from broker_client import DEFAULT_BROKER, connect, describe_error, job_pb, pb

# Deadline of the unary calls (Heartbeat, Complete); the channel retries UNAVAILABLE within it.
CALL_TIMEOUT = 10.0
# How often the heartbeat thread looks again while no job runs.
IDLE_BEAT = 1.0

log = logging.getLogger("worker")


class Failure(Exception):
    """Raised by a handler: the attempt failed. `non_retryable` fails the job for good instead of retrying it."""

    def __init__(self, message: str, non_retryable: bool = False):
        super().__init__(message)
        self.non_retryable = non_retryable


class Job:
    """One running attempt: the assignment, the progress to send with the next heartbeat, and why it must stop."""

    def __init__(self, assignment: pb.Assignment):
        self.lease_id = assignment.lease_id
        self.job = assignment.job
        self.heartbeat_interval = assignment.heartbeat_interval.ToTimedelta().total_seconds() or IDLE_BEAT
        self.progress = None
        self.stop = threading.Event()  # set when the job must stop; `why` says why
        self.why = None  # "cancelled", "lost" or "shutdown"

    def report(self, percent: int, message: str = "") -> None:
        self.progress = job_pb.Progress(percent=percent, message=message)

    def stopping(self, why: str) -> None:
        if self.why is None:
            self.why = why
        self.stop.set()


def handle(job: Job, worker_id: str) -> bytes:
    """The example's work. Returns the result; raises Failure; returns early (any value) once `job.stop` is set."""
    try:
        payload = json.loads(job.job.spec.payload or b"{}")
        text, seconds = str(payload["text"]), float(payload.get("seconds", 0))
    except (ValueError, KeyError, TypeError) as error:
        raise Failure(f'payload must be JSON {{"text": "...", "seconds": 2}}: {error!r}', non_retryable=True)
    for step in range(1, 11):
        if job.stop.wait(seconds / 10):
            return b""
        job.report(step * 10, f"step {step} of 10")
    return json.dumps({"worker": worker_id, "text": text.upper()}).encode()


class Worker:
    def __init__(self, stub, worker_id: str, queues: list, capacity: int):
        self.stub = stub
        self.worker_id = worker_id
        self.queues = queues
        self.capacity = capacity
        self.jobs = {}  # lease_id -> Job, for every attempt not yet completed
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=capacity, thread_name_prefix="job")
        self.closing = threading.Event()
        self.call = None  # the current Lease stream, cancelled on shutdown

    # -- the Lease stream ----------------------------------------------------------------------------------------

    def serve(self) -> None:
        """Holds a Lease stream until shutdown, reopening it with jittered backoff while the broker is unavailable."""
        backoff = 0.2
        while not self.closing.is_set():
            try:
                self.session()
                backoff = 0.2
            except grpc.RpcError as error:
                if self.closing.is_set():
                    return
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                log.warning("lease stream lost (%s); reconnecting", error.details())
            self.closing.wait(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, 10.0)

    def session(self) -> None:
        requests = queue.Queue()
        with self.lock:
            if self.closing.is_set():
                return
            # Leases still running from an earlier stream: naming them keeps them ours (and counted) on this one.
            held = list(self.jobs)
            register = pb.Register(worker_id=self.worker_id, queues=self.queues, capacity=self.capacity)
            register.held_lease_ids.extend(held)
            requests.put(pb.LeaseRequest(register=register))
            # The request stream stays open (SetCapacity would go there); None ends it.
            self.call = self.stub.Lease(iter(requests.get, None))
        log.info("lease stream open: queues %s, capacity %d", ",".join(self.queues), self.capacity)
        try:
            for response in self.call:
                kind = response.WhichOneof("response")
                if kind == "assignment":
                    self.start(response.assignment)
                elif kind == "cancel":
                    self.stop_job(response.cancel.lease_id, "cancelled")
        finally:
            requests.put(None)

    def start(self, assignment: pb.Assignment) -> None:
        job = Job(assignment)
        with self.lock:
            self.jobs[job.lease_id] = job
            if self.closing.is_set():  # assigned while shutting down: give it straight back
                job.stopping("shutdown")
        log.info("job %s attempt %d (lease %s)", job.job.id, job.job.attempt, job.lease_id)
        self.pool.submit(self.run, job)

    def stop_job(self, lease_id: str, why: str) -> None:
        with self.lock:
            job = self.jobs.get(lease_id)
        if job:
            job.stopping(why)

    # -- one job -------------------------------------------------------------------------------------------------

    def run(self, job: Job) -> None:
        try:
            outcome = {"success": pb.Success(result=handle(job, self.worker_id))}
        except Failure as failure:
            outcome = {"failure": pb.Failure(message=str(failure), non_retryable=failure.non_retryable)}
        except Exception as error:  # a bug in the handler: retry the job with backoff
            log.exception("handler failed on job %s", job.job.id)
            outcome = {"failure": pb.Failure(message=f"handler crashed: {error!r}")}
        if job.why == "lost":
            log.info("job %s: lease lost; dropping it without reporting", job.job.id)
        else:
            if job.why == "cancelled":
                outcome = {"failure": pb.Failure(message="cancelled", non_retryable=True)}
            elif job.why == "shutdown":
                outcome = {"release": pb.Release()}
            self.complete(job, outcome)
        with self.lock:
            del self.jobs[job.lease_id]

    def complete(self, job: Job, outcome: dict) -> None:
        try:
            reply = self.stub.Complete(pb.CompleteRequest(lease_id=job.lease_id, **outcome), timeout=CALL_TIMEOUT)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.ABORTED:  # fencing: another worker holds the job now
                log.info("job %s: lease lost before completing; dropping it", job.job.id)
            else:  # the lease expires on the broker and the job is retried
                log.error("job %s: completing failed: %s", job.job.id, describe_error(error))
            return
        log.info("job %s -> %s", job.job.id, job_pb.JobState.Name(reply.state))

    # -- heartbeats ----------------------------------------------------------------------------------------------

    def heartbeat(self) -> None:
        """Every heartbeat interval, extends all running leases in one call and sends their progress."""
        interval = IDLE_BEAT
        while not self.closing.wait(interval):
            with self.lock:
                jobs = [job for job in self.jobs.values() if not job.stop.is_set()]
            interval = min([job.heartbeat_interval for job in jobs], default=IDLE_BEAT)
            if not jobs:
                continue
            beats = [pb.LeaseBeat(lease_id=job.lease_id, progress=job.progress) for job in jobs]
            try:
                reply = self.stub.Heartbeat(pb.HeartbeatRequest(leases=beats), timeout=min(interval, CALL_TIMEOUT))
            except grpc.RpcError as error:  # the leases hold until they expire: try again next interval
                log.warning("heartbeat failed: %s", describe_error(error))
                continue
            for status in reply.leases:
                if not status.active:
                    self.stop_job(status.lease_id, "lost")
                elif status.cancel_requested:
                    self.stop_job(status.lease_id, "cancelled")

    # -- shutdown ------------------------------------------------------------------------------------------------

    def shutdown(self, lease_thread: threading.Thread) -> None:
        """Stops every running job, closes the stream, and waits until each job is released (completed with Release
        as its handler returns): released jobs go back to the queue at once."""
        with self.lock:
            self.closing.set()
            jobs, call = list(self.jobs.values()), self.call
        for job in jobs:
            job.stopping("shutdown")
        if call is not None:
            call.cancel()
        lease_thread.join()
        self.pool.shutdown(wait=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", default=DEFAULT_BROKER, help="host:port (default %(default)s, $JOBBROKER_BROKER)")
    parser.add_argument("--queue", action="append", required=True, help="queue to take jobs from; repeatable")
    parser.add_argument("--capacity", type=int, default=4, help="most jobs at once (default %(default)s)")
    parser.add_argument("--worker-id", default=f"{socket.gethostname()}-py-{uuid.uuid4().hex[:6]}")
    args = parser.parse_args()
    log_format = f"%(asctime)s {args.worker_id} %(threadName)s %(levelname)s %(message)s"
    logging.basicConfig(level=logging.INFO, format=log_format)

    worker = Worker(connect(args.broker), args.worker_id, args.queue, args.capacity)
    done = threading.Event()
    failed = []

    def serve() -> None:
        try:
            worker.serve()
        except grpc.RpcError as error:
            failed.append(error)
            log.error("the broker refused the worker: %s", describe_error(error))
        finally:
            done.set()

    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    lease_thread = threading.Thread(target=serve, name="lease", daemon=True)
    lease_thread.start()
    threading.Thread(target=worker.heartbeat, name="heartbeat", daemon=True).start()
    done.wait()
    log.info("shutting down: releasing %d running job(s)", len(worker.jobs))
    worker.shutdown(lease_thread)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
