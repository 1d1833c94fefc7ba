-- Claims and heartbeats write lease_expires_at; an index on it made every heartbeat a non-HOT update and cost
-- every claim one more index insertion. Leased rows are few (at most the connected capacity) and all have a
-- lease_id, so the reaper finds the expired ones through jobs_lease instead.
DROP INDEX jobs_expiry;
