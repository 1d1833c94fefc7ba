-- Live jobs (QUEUED and LEASED) only: the hot table. Terminal jobs move to finished_jobs, so claims, heartbeats
-- and completions touch a table whose size is the backlog, not the history.
CREATE TABLE jobs (
    id                   uuid PRIMARY KEY,
    queue                text NOT NULL,
    kind                 text NOT NULL,
    payload              bytea NOT NULL,
    priority             integer NOT NULL,
    run_at               timestamptz NOT NULL,
    max_attempts         integer NOT NULL,
    lease_ttl_ms         bigint NOT NULL,
    execution_timeout_ms bigint,
    idempotency_key      text,
    initial_backoff_ms   bigint NOT NULL,
    max_backoff_ms       bigint NOT NULL,
    backoff_multiplier   double precision NOT NULL,
    metadata             jsonb NOT NULL,
    created_at           timestamptz NOT NULL,
    attempt              integer NOT NULL DEFAULT 0,
    worker_id            text,
    lease_id             uuid,
    last_error           text,
    progress_percent     integer,
    progress_message     text,
    state                text NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'leased')),
    -- The Lease stream the current lease was delivered on: a closed stream shortens only its own leases.
    session_id           uuid,
    -- Never later than attempt_deadline, so one index finds both expired leases and execution timeouts.
    lease_expires_at     timestamptz,
    attempt_deadline     timestamptz,
    cancel_requested     boolean NOT NULL DEFAULT false
);

-- Claims: highest priority, then earliest run_at, then enqueue order (ids are UUIDv7).
CREATE INDEX jobs_claim ON jobs (queue, priority DESC, run_at, id) WHERE state = 'queued';
CREATE UNIQUE INDEX jobs_lease ON jobs (lease_id) WHERE lease_id IS NOT NULL;
CREATE INDEX jobs_expiry ON jobs (lease_expires_at) WHERE state = 'leased';

-- Terminal jobs (SUCCEEDED, FAILED, CANCELLED), kept for the retention period.
CREATE TABLE finished_jobs (
    id                   uuid PRIMARY KEY,
    queue                text NOT NULL,
    kind                 text NOT NULL,
    payload              bytea NOT NULL,
    priority             integer NOT NULL,
    run_at               timestamptz NOT NULL,
    max_attempts         integer NOT NULL,
    lease_ttl_ms         bigint NOT NULL,
    execution_timeout_ms bigint,
    idempotency_key      text,
    initial_backoff_ms   bigint NOT NULL,
    max_backoff_ms       bigint NOT NULL,
    backoff_multiplier   double precision NOT NULL,
    metadata             jsonb NOT NULL,
    created_at           timestamptz NOT NULL,
    attempt              integer NOT NULL,
    worker_id            text,
    lease_id             uuid,
    last_error           text,
    progress_percent     integer,
    progress_message     text,
    state                text NOT NULL CHECK (state IN ('succeeded', 'failed', 'cancelled')),
    finished_at          timestamptz NOT NULL,
    result               bytea
);

CREATE INDEX finished_jobs_retention ON finished_jobs (finished_at);
CREATE INDEX finished_jobs_queue_state ON finished_jobs (queue, state, finished_at);

-- Idempotency keys of retained jobs (live or finished); deleted with the finished job by retention.
CREATE TABLE idempotency_keys (
    queue     text NOT NULL,
    key       text NOT NULL,
    job_id    uuid NOT NULL,
    spec_hash bytea NOT NULL,
    PRIMARY KEY (queue, key)
);
