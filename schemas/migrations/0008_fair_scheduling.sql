-- Many users, few GPUs: weighted fair queuing between users, priority tiers, GPU-time quotas
-- and retention. Released migrations are never edited.
--
-- Fair order (start-time fair queuing, per queue): a job's virtual_start is the later of the
-- queue's virtual clock (the virtual_start of the job in service; with none, the queue's head;
-- when nothing is queued either, the largest virtual finish of any user) and its user's
-- virtual finish; the user's virtual finish
-- then advances by the job's expected GPU seconds divided by its tier's weight. Claims take the
-- smallest virtual_start: one index scan, however deep the backlog and however many users.

ALTER TABLE jobs
    ADD COLUMN tier          TEXT NOT NULL DEFAULT 'standard'
                             CHECK (tier IN ('premium', 'standard', 'bulk')),
    -- Expected GPU seconds (the catalog's expected time times the job's units): what fair
    -- order advances by and what a quota reserves while the job is unfinished.
    ADD COLUMN cost_s        DOUBLE PRECISION NOT NULL DEFAULT 0 CHECK (cost_s >= 0),
    ADD COLUMN virtual_start DOUBLE PRECISION NOT NULL DEFAULT 0,
    -- Set when retention deleted the job's files: the row stays, its downloads answer 410.
    ADD COLUMN expired_at    TIMESTAMPTZ;

-- Jobs queued before this migration keep their arrival order, ahead of everything new.
UPDATE jobs AS j
   SET virtual_start = extract(EPOCH FROM j.created_at - first.created_at)
  FROM (SELECT queue, min(created_at) AS created_at FROM jobs WHERE status = 'queued'
         GROUP BY queue) AS first
 WHERE j.status = 'queued' AND j.queue = first.queue;

-- The claim's head and the backlog's figures, read from the index alone.
CREATE INDEX jobs_fair_idx ON jobs (queue, virtual_start, id) INCLUDE (units, cost_s)
    WHERE status = 'queued';
-- Batch-mates of the head (same batch key) in fair order, without scanning other keys.
CREATE INDEX jobs_fair_batch_idx ON jobs (queue, batch_key, virtual_start, id)
    WHERE status = 'queued';
DROP INDEX jobs_queued_batch_idx;
DROP INDEX jobs_queued_idx;

-- The running jobs of a queue (the clock's job in service, the reaper, the queues' figures). It
-- replaces 0002's jobs_lease_idx, which indexed lease_expires_at: with no index on that column
-- a heartbeat is a HOT update (no index entry written), and a video job heartbeats dozens of
-- times. The reaper sorts the few processing rows instead. Free space on each page keeps
-- those updates on the row's page.
DROP INDEX jobs_lease_idx;
CREATE INDEX jobs_processing_idx ON jobs (queue) WHERE status = 'processing';
ALTER TABLE jobs SET (fillfactor = 90);

-- What a quota reserves: the expected cost of a user's unfinished jobs.
CREATE INDEX jobs_user_unfinished_idx ON jobs (user_id) INCLUDE (cost_s)
    WHERE status IN ('queued', 'processing');
-- The retention sweeper's scan: finished jobs not yet expired, oldest first.
CREATE INDEX jobs_finished_unexpired_idx ON jobs (completed_at)
    WHERE expired_at IS NULL AND status IN ('completed', 'failed', 'cancelled');

-- Each user's virtual finish per queue. A user's concurrent submissions serialize on the row;
-- different users never wait for each other.
CREATE TABLE fair_shares (
    queue          TEXT NOT NULL,
    user_id        UUID NOT NULL,
    virtual_finish DOUBLE PRECISION NOT NULL,
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (queue, user_id)
);
-- The clock of an idle queue: the largest virtual finish, one backward index scan.
CREATE INDEX fair_shares_finish_idx ON fair_shares (queue, virtual_finish);

-- GPU seconds charged to a user: one row per attempt that ran (completed, failed or
-- cancelled), the measured time times the deployment's GPU share. Quotas sum a rolling window.
CREATE TABLE gpu_usage (
    job_id      UUID NOT NULL,
    attempt     INTEGER NOT NULL,
    user_id     UUID NOT NULL,
    queue       TEXT NOT NULL,
    tier        TEXT NOT NULL,
    gpu_seconds DOUBLE PRECISION NOT NULL CHECK (gpu_seconds >= 0),
    charged_at  TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (job_id, attempt)
);
CREATE INDEX gpu_usage_user_idx ON gpu_usage (user_id, charged_at);
