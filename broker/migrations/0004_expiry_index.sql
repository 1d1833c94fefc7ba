-- The reaper's index, re-declared so that its predicate is not `state = 'leased'`: with that predicate the
-- planner could answer any "state = 'leased'" condition by scanning every leased row (and the dead index entries
-- left since the last vacuum), and with statistics that say few jobs are leased it did so for every completion
-- batch, however small. Leased rows, and only they, have a deadline, so the set of rows indexed is the same.
DROP INDEX jobs_expiry;
CREATE INDEX jobs_expiry ON jobs (lease_expires_at) WHERE lease_expires_at IS NOT NULL;
