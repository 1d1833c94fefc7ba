-- W3C trace context of the Enqueue request that created the job, handed to the worker with every assignment.
ALTER TABLE jobs ADD COLUMN traceparent text, ADD COLUMN tracestate text;
ALTER TABLE finished_jobs ADD COLUMN traceparent text, ADD COLUMN tracestate text;

-- When the current lease was granted (database clock): the job-duration metric is measured from it at completion.
ALTER TABLE jobs ADD COLUMN leased_at timestamptz;
