#!/usr/bin/env node
// Enqueue jobs on a jobbroker: one job from the command line, or a batch with one payload per line of stdin.
//
//   node enqueue.js --queue ebooks --kind render '{"text": "page one"}'
//   seq 1 200 | sed 's/.*/{"text": "page &"}/' | node enqueue.js --queue ebooks --kind render --batch
//
// Options: --broker host:port ($JOBBROKER_BROKER), --priority N, --delay SECONDS, --key KEY (batch: KEY-1, KEY-2, …;
// default a random key, so the channel's retries never enqueue a job twice), --timeout SECONDS (each call's deadline).
// Prints `<job id> created` (or `existing` when the key matched an earlier job) per job, in input order. Exit code 2
// when the broker refuses the input (the bad fields are named on stderr), 1 on other errors.
'use strict';

const { randomUUID } = require('node:crypto');
const { parseArgs } = require('node:util');
const { grpc, DEFAULT_BROKER, connect, call, describeError, fromMillis } = require('./client');

const BATCH = 1000; // the broker's default limit of jobs per Enqueue; each call is stored atomically

async function main() {
  const { values: opts, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      broker: { type: 'string', default: DEFAULT_BROKER },
      queue: { type: 'string' },
      kind: { type: 'string' },
      priority: { type: 'string', default: '0' },
      delay: { type: 'string', default: '0' },
      key: { type: 'string' },
      timeout: { type: 'string', default: '10' },
      batch: { type: 'boolean', default: false },
    },
  });
  if (!opts.queue || !opts.kind || opts.batch === (positionals.length === 1) || positionals.length > 1) {
    console.error('usage: enqueue.js --queue Q --kind K [--priority N] [--delay S] [--key K] (PAYLOAD | --batch)');
    return 2;
  }
  const payloads = opts.batch ? await stdinLines() : positionals;
  const key = opts.key || randomUUID();
  const delayMs = Number(opts.delay) * 1000;
  const jobs = payloads.map((payload, i) => ({
    queue: opts.queue,
    kind: opts.kind,
    payload: Buffer.from(payload),
    priority: Number(opts.priority),
    idempotency_key: opts.batch ? `${key}-${i + 1}` : key,
    run_at: delayMs > 0 ? fromMillis(Date.now() + delayMs) : null,
  }));
  const client = connect(opts.broker);
  for (let start = 0; start < jobs.length; start += BATCH) {
    try {
      const reply = await call(client, 'Enqueue', { jobs: jobs.slice(start, start + BATCH) }, Number(opts.timeout));
      for (const job of reply.jobs) console.log(job.id, job.created ? 'created' : 'existing');
    } catch (error) {
      console.error(describeError(error));
      if (start > 0) console.error(`the first ${start} jobs were enqueued (listed above)`);
      return error.code === grpc.status.INVALID_ARGUMENT ? 2 : 1;
    }
  }
  return 0;
}

async function stdinLines() {
  let text = '';
  for await (const chunk of process.stdin) text += chunk;
  return text.split('\n').filter((line) => line !== '');
}

main().then((code) => {
  process.exitCode = code;
});
