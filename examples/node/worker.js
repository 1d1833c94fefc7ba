#!/usr/bin/env node
// A small jobbroker worker in Node: holds a Lease stream, runs assigned jobs concurrently, heartbeats all its leases
// on one timer (with progress), and completes each job fenced by its lease.
//
//   node worker.js --queue ebooks [--capacity 4] [--worker-id ID] [--broker host:port]
//
// The example handler (`handle`, replace it with your work) takes a JSON payload {"text": "...", "seconds": 2},
// works for `seconds` in ten steps reporting progress, and returns {"worker": <worker id>, "text": <TEXT>}.
// A cancelled job is completed as a non-retryable failure (it ends CANCELLED); a job whose lease is lost (heartbeat
// `active: false`, Complete ABORTED) is dropped silently; the stream is reopened with backoff while the broker is
// unavailable; SIGTERM/SIGINT releases the running jobs (back to the queue at once) and exits 0.
'use strict';

const os = require('node:os');
const { randomUUID } = require('node:crypto');
const { parseArgs } = require('node:util');
const { setTimeout: sleep } = require('node:timers/promises');
const { grpc, DEFAULT_BROKER, connect, call, describeError, toMillis } = require('./client');

const IDLE_BEAT_MS = 1000; // how often the heartbeat timer looks again while no job runs

/** The example's work; `job.signal` aborts when the job must stop (then the value returned does not matter). */
async function handle(job, workerId) {
  let text, seconds;
  try {
    const payload = JSON.parse(job.job.spec.payload.toString() || '{}');
    [text, seconds] = [String(payload.text), Number(payload.seconds || 0)];
    if (payload.text === undefined || Number.isNaN(seconds)) throw new Error('no "text", or "seconds" not a number');
  } catch (error) {
    throw Object.assign(new Error(`payload must be JSON {"text": "...", "seconds": 2}: ${error.message}`), {
      nonRetryable: true,
    });
  }
  for (let step = 1; step <= 10; step++) {
    await sleep((seconds * 1000) / 10, null, { signal: job.signal }).catch(() => {});
    if (job.signal.aborted) return Buffer.alloc(0);
    job.progress = { percent: step * 10, message: `step ${step} of 10` };
  }
  return Buffer.from(JSON.stringify({ worker: workerId, text: text.toUpperCase() }));
}

class Worker {
  constructor(client, workerId, queues, capacity) {
    Object.assign(this, { client, workerId, queues, capacity });
    this.jobs = new Map(); // lease_id -> running job: { lease_id, job, interval, progress, why, abort, signal }
    this.closing = false;
    this.stream = null;
    this.backoff = 200;
  }

  /** Opens a Lease stream, naming the leases still running from an earlier one (they stay ours). */
  open() {
    const stream = this.client.Lease();
    this.stream = stream;
    stream.write({
      register: {
        worker_id: this.workerId,
        queues: this.queues,
        capacity: this.capacity,
        held_lease_ids: [...this.jobs.keys()],
      },
    });
    stream.on('data', (message) => {
      this.backoff = 200;
      if (message.response === 'assignment') this.start(message.assignment);
      else if (message.response === 'cancel') this.stop(message.cancel.lease_id, 'cancelled');
    });
    stream.on('error', () => {}); // every ending is handled once, through 'status'
    stream.on('status', async (status) => {
      if (this.closing) return;
      if (status.code !== grpc.status.OK && status.code !== grpc.status.UNAVAILABLE) {
        console.error(`the broker refused the worker: ${describeError(status)}`);
        process.exit(1);
      }
      console.error(`lease stream closed (${status.details}); reconnecting`);
      await sleep(this.backoff * (0.5 + Math.random() / 2));
      this.backoff = Math.min(this.backoff * 2, 10000);
      if (!this.closing) this.open();
    });
    console.error(`lease stream open: queues ${this.queues}, capacity ${this.capacity}`);
  }

  start(assignment) {
    const abort = new AbortController();
    const job = {
      lease_id: assignment.lease_id,
      job: assignment.job,
      interval: toMillis(assignment.heartbeat_interval) || IDLE_BEAT_MS,
      progress: null,
      why: null, // 'cancelled', 'lost' or 'shutdown' once it must stop
      abort,
      signal: abort.signal,
    };
    this.jobs.set(job.lease_id, job);
    console.error(`job ${job.job.id} attempt ${job.job.attempt} (lease ${job.lease_id})`);
    if (this.closing) this.stop(job.lease_id, 'shutdown');
    job.done = this.run(job);
  }

  stop(leaseId, why) {
    const job = this.jobs.get(leaseId);
    if (job && !job.why) {
      job.why = why;
      job.abort.abort();
    }
  }

  async run(job) {
    let outcome;
    try {
      outcome = { success: { result: await handle(job, this.workerId) } };
    } catch (error) {
      outcome = { failure: { message: error.message, non_retryable: Boolean(error.nonRetryable) } };
    }
    if (job.why === 'cancelled') outcome = { failure: { message: 'cancelled', non_retryable: true } };
    if (job.why === 'shutdown') outcome = { release: {} };
    if (job.why === 'lost') {
      console.error(`job ${job.job.id}: lease lost; dropping it without reporting`);
    } else {
      try {
        const reply = await call(this.client, 'Complete', { lease_id: job.lease_id, ...outcome });
        console.error(`job ${job.job.id} -> ${reply.state}`);
      } catch (error) {
        // ABORTED: fencing, another worker holds the job now. Anything else: the lease expires and the job is retried.
        console.error(`job ${job.job.id}: not completed: ${describeError(error)}`);
      }
    }
    this.jobs.delete(job.lease_id);
  }

  /** Every heartbeat interval, extends all running leases in one call and sends their progress. */
  async heartbeat() {
    while (!this.closing) {
      const running = [...this.jobs.values()].filter((job) => !job.why);
      const interval = running.length ? Math.min(...running.map((job) => job.interval)) : IDLE_BEAT_MS;
      await sleep(interval);
      const beating = [...this.jobs.values()].filter((job) => !job.why);
      if (this.closing || !beating.length) continue;
      try {
        const leases = beating.map((job) => ({ lease_id: job.lease_id, progress: job.progress }));
        const reply = await call(this.client, 'Heartbeat', { leases }, interval / 1000);
        for (const status of reply.leases) {
          if (!status.active) this.stop(status.lease_id, 'lost');
          else if (status.cancel_requested) this.stop(status.lease_id, 'cancelled');
        }
      } catch (error) {
        console.error(`heartbeat failed: ${describeError(error)}`); // the leases hold until they expire
      }
    }
  }

  /** Releases every running job (each completes with Release as its handler returns), then closes the stream. */
  async shutdown() {
    this.closing = true;
    console.error(`shutting down: releasing ${this.jobs.size} running job(s)`);
    for (const leaseId of this.jobs.keys()) this.stop(leaseId, 'shutdown');
    await Promise.all([...this.jobs.values()].map((job) => job.done));
    this.stream.cancel();
    this.client.close();
  }
}

function main() {
  const { values: opts } = parseArgs({
    options: {
      broker: { type: 'string', default: DEFAULT_BROKER },
      queue: { type: 'string', multiple: true },
      capacity: { type: 'string', default: '4' },
      'worker-id': { type: 'string', default: `${os.hostname()}-node-${randomUUID().slice(0, 6)}` },
    },
  });
  if (!opts.queue) {
    console.error('usage: worker.js --queue Q [--queue Q2] [--capacity N] [--worker-id ID] [--broker host:port]');
    process.exit(2);
  }
  const worker = new Worker(connect(opts.broker), opts['worker-id'], opts.queue, Number(opts.capacity));
  worker.open();
  worker.heartbeat();
  for (const signal of ['SIGTERM', 'SIGINT']) process.once(signal, () => worker.shutdown());
}

main();
