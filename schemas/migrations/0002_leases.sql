-- Model replicas pull their work: a claim takes a lease that a heartbeat extends, and every
-- outcome is fenced by the attempt number. Released migrations are never edited.

ALTER TABLE jobs
    ADD COLUMN claimed_by        TEXT,
    ADD COLUMN lease_expires_at  TIMESTAMPTZ,
    -- Jobs of one queue with equal batch keys share one pipeline call (same settings).
    ADD COLUMN batch_key         TEXT,
    -- Work in the queue's capacity unit: images for SDXL, jobs for WAN.
    ADD COLUMN units             INTEGER NOT NULL DEFAULT 1 CHECK (units > 0);

UPDATE jobs
   SET units = coalesce((metadata->>'num_images')::int, 1),
       batch_key = job_type
 WHERE queue = 'sdxl_queue';
UPDATE jobs SET batch_key = job_type WHERE batch_key IS NULL;
ALTER TABLE jobs ALTER COLUMN batch_key SET NOT NULL;

-- The reaper's scan: only processing rows, ordered by expiry.
CREATE INDEX jobs_lease_idx ON jobs (lease_expires_at) WHERE status = 'processing';

-- The queue's head and its backlog in units, read from the index alone.
DROP INDEX jobs_queued_idx;
CREATE INDEX jobs_queued_idx ON jobs (queue, created_at, id) INCLUDE (units)
    WHERE status = 'queued';

-- Claims fill a batch with jobs of the head's batch key without scanning other keys.
CREATE INDEX jobs_queued_batch_idx ON jobs (queue, batch_key, created_at, id)
    WHERE status = 'queued';
