-- Limits that must hold across ingress replicas live in the database. Released migrations are
-- never edited.

-- One row per rate-limited subject ("key:<hash>" or "user:<uuid>"): its GCRA theoretical
-- arrival time. A row whose tat has passed means the same as no row, so pruning is optional.
CREATE TABLE rate_limits (
    subject TEXT PRIMARY KEY,
    tat     TIMESTAMPTZ NOT NULL
);

-- The per-user cap on queued jobs counts these rows at every submission.
CREATE INDEX jobs_user_queued_idx ON jobs (user_id) WHERE status = 'queued';
