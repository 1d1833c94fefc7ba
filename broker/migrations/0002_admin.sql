-- Per-queue settings operators change through AdminService. A queue without a row is unpaused and unbounded.
CREATE TABLE queues (
    name       text PRIMARY KEY,
    paused     boolean NOT NULL DEFAULT false,
    -- Most QUEUED jobs the queue accepts; NULL for no bound.
    max_depth  bigint CHECK (max_depth > 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Lease streams connected to any replica, so AdminService lists workers across replicas. Each replica refreshes
-- seen_at for its own streams; rows of a replica that stopped refreshing are stale and removed by any replica.
CREATE TABLE worker_sessions (
    id           uuid PRIMARY KEY,
    replica      text NOT NULL,
    worker_id    text NOT NULL,
    queues       text[] NOT NULL,
    capacity     integer NOT NULL,
    labels       jsonb NOT NULL,
    connected_at timestamptz NOT NULL DEFAULT now(),
    seen_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX worker_sessions_replica ON worker_sessions (replica);
