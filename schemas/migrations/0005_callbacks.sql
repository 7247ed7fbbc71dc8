-- Callbacks: an outbox of deliveries owed to the platform's callback URL. Released migrations
-- are never edited.
--
-- A job that ends (completed, failed or cancelled, by whatever statement) gets its delivery
-- row in the same transaction, from the trigger below, when the connection that ends it has
-- callbacks on (the service sets the session parameter ourvidz.callbacks = 'on' on its
-- connections when OURVIDZ_CALLBACK_URL is set). Deliverers in any replica claim due rows
-- with SKIP LOCKED; retries wait in next_attempt_at, so they survive restarts.
CREATE TABLE callback_deliveries (
    id              UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    job_id          UUID NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    event           TEXT NOT NULL,
    -- The Standard Webhooks webhook-id: stable per job and event, the receiver's dedup key.
    webhook_id      TEXT NOT NULL UNIQUE,
    status          TEXT NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    locked_until    TIMESTAMPTZ,
    -- Every attempt: {"at", "status_code" or "error", "duration_s"}.
    history         JSONB NOT NULL DEFAULT '[]'::jsonb,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    delivered_at    TIMESTAMPTZ
);

CREATE INDEX callback_deliveries_due_idx ON callback_deliveries (next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX callback_deliveries_job_idx ON callback_deliveries (job_id);

CREATE FUNCTION ourvidz_owe_callback() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('ourvidz.callbacks', true), '') = 'on' THEN
        INSERT INTO callback_deliveries (job_id, event, webhook_id)
        VALUES (NEW.id, 'job.' || NEW.status, NEW.id::text || '.' || NEW.status)
        ON CONFLICT (webhook_id) DO NOTHING;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_owe_callback
    AFTER UPDATE OF status ON jobs
    FOR EACH ROW
    WHEN (NEW.status IN ('completed', 'failed', 'cancelled') AND OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION ourvidz_owe_callback();
