// What every jobbroker example in Node shares: the API loaded from the repository's proto/ at run time
// (@grpc/proto-loader, no code generation), a client with retries and keepalive, deadlines, and readable errors.
'use strict';

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_DIR = process.env.JOBBROKER_PROTO_DIR || path.join(__dirname, '..', '..', 'proto');
const DEFAULT_BROKER = process.env.JOBBROKER_BROKER || '127.0.0.1:50051';

const definition = protoLoader.loadSync('jobbroker/v1/broker.proto', {
  includeDirs: [PROTO_DIR],
  keepCase: true, // field names as in the .proto: lease_id, not leaseId
  longs: String, // int64 (Timestamp/Duration seconds) as strings
  enums: String, // JobState as 'JOB_STATE_SUCCEEDED'
  defaults: true,
  oneofs: true, // a oneof's name says which member is set: response.response === 'assignment'
});
const api = grpc.loadPackageDefinition(definition).jobbroker.v1;

// gRPC's retry policy (https://grpc.io/docs/guides/retry/): the channel itself retries UNAVAILABLE (broker
// restarting, connection refused) with exponential backoff, within each call's deadline. No other code is retried:
// INVALID_ARGUMENT, NOT_FOUND, ABORTED and the rest mean the same on every attempt.
const SERVICE_CONFIG = {
  methodConfig: [
    {
      name: [{ service: 'jobbroker.v1.BrokerService' }],
      retryPolicy: {
        maxAttempts: 5,
        initialBackoff: '0.2s',
        maxBackoff: '5s',
        backoffMultiplier: 2,
        retryableStatusCodes: ['UNAVAILABLE'],
      },
    },
  ],
};

/** A BrokerService client on a plaintext channel to `address` (`host:port`; an `http://` prefix is accepted). */
function connect(address = DEFAULT_BROKER) {
  return new api.BrokerService(address.replace(/^http:\/\//, ''), grpc.credentials.createInsecure(), {
    'grpc.service_config': JSON.stringify(SERVICE_CONFIG),
    // Notice a vanished broker on an idle stream (a worker waiting for jobs) within ~30 s.
    'grpc.keepalive_time_ms': 20000,
    'grpc.keepalive_timeout_ms': 10000,
  });
}

/** Calls unary method `name` with a deadline `seconds` from now; resolves to the reply. */
function call(client, name, request, seconds = 10) {
  return new Promise((resolve, reject) => {
    client[name](request, { deadline: Date.now() + seconds * 1000 }, (error, reply) =>
      error ? reject(error) : resolve(reply),
    );
  });
}

/** `CODE: message` of a gRPC error (the broker's message names each bad field of an INVALID_ARGUMENT). */
function describeError(error) {
  return error.code === undefined ? String(error) : `${grpc.status[error.code]}: ${error.details}`;
}

/** A google.protobuf.Timestamp (or Duration) for `ms` milliseconds. */
function fromMillis(ms) {
  const whole = Math.round(ms);
  return { seconds: String(Math.floor(whole / 1000)), nanos: (whole % 1000) * 1e6 };
}

/** Milliseconds of a google.protobuf.Duration (or Timestamp). */
function toMillis(value) {
  return value ? Number(value.seconds) * 1000 + value.nanos / 1e6 : 0;
}

module.exports = { grpc, DEFAULT_BROKER, connect, call, describeError, fromMillis, toMillis };
