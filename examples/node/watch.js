#!/usr/bin/env node
// Wait for a job's result through WatchJob, printing each change the broker reports.
//
//   node watch.js [--broker host:port] [--timeout SECONDS] <job id>
//
// Changes go to stderr; the result of a SUCCEEDED job goes to stdout and the exit code is 0. A FAILED or CANCELLED
// job exits 1 with its last error, an unknown job 1, no end before the deadline (default 1 h) 3. When the broker
// becomes unreachable the watch is opened again (it starts with the current state, so no outcome is missed).
'use strict';

const { parseArgs } = require('node:util');
const { setTimeout: sleep } = require('node:timers/promises');
const { grpc, DEFAULT_BROKER, connect, describeError } = require('./client');

const TERMINAL = ['JOB_STATE_SUCCEEDED', 'JOB_STATE_FAILED', 'JOB_STATE_CANCELLED'];

function describe(job) {
  let line = `${job.state.replace('JOB_STATE_', '')} attempt ${job.attempt}`;
  if (job.state === 'JOB_STATE_LEASED') line += ` by ${job.worker_id}`;
  if (job.progress) line += `: ${job.progress.percent}% ${job.progress.message}`;
  if (job.last_error) line += ` (last error: ${job.last_error})`;
  return line;
}

/** One WatchJob stream: resolves to the terminal job, or to null when the stream ended before one. */
function watchOnce(client, id, deadline) {
  return new Promise((resolve, reject) => {
    let last = null;
    const stream = client.WatchJob({ id }, { deadline });
    stream.on('data', ({ job }) => {
      console.error(describe(job));
      last = job;
    });
    stream.on('error', reject);
    stream.on('end', () => resolve(last && TERMINAL.includes(last.state) ? last : null));
  });
}

async function watch(client, id, deadline) {
  for (let backoff = 200; ; backoff = Math.min(backoff * 2, 5000)) {
    try {
      const job = await watchOnce(client, id, deadline);
      if (job) return job;
    } catch (error) {
      if (error.code !== grpc.status.UNAVAILABLE || Date.now() + backoff > deadline) throw error;
      console.error(`broker unavailable (${error.details}); watching again`);
    }
    await sleep(backoff * (0.5 + Math.random() / 2));
  }
}

async function main() {
  const { values: opts, positionals } = parseArgs({
    allowPositionals: true,
    options: { broker: { type: 'string', default: DEFAULT_BROKER }, timeout: { type: 'string', default: '3600' } },
  });
  if (positionals.length !== 1) {
    console.error('usage: watch.js [--broker host:port] [--timeout SECONDS] <job id>');
    return 2;
  }
  try {
    const job = await watch(connect(opts.broker), positionals[0], Date.now() + Number(opts.timeout) * 1000);
    if (job.state !== 'JOB_STATE_SUCCEEDED') return 1;
    process.stdout.write(job.result);
    return 0;
  } catch (error) {
    console.error(describeError(error));
    return error.code === grpc.status.DEADLINE_EXCEEDED ? 3 : 1;
  }
}

main().then((code) => {
  process.exitCode = code;
});
