-- Callbacks owed per job, not per connection. Released migrations are never edited.
--
-- 0005's trigger owed a callback when the connection that ended the job had the session
-- parameter ourvidz.callbacks = 'on'. Behind a transaction-mode pooler (PgBouncer, Supabase's
-- port 6543) there is no session to carry it: the pooler refuses unknown startup parameters,
-- and a SET lasts only until the server connection serves another client. So the job says it:
-- a job submitted while a callback URL was configured owes one when it ends, whichever
-- connection (and replica) ends it.
ALTER TABLE jobs ADD COLUMN owes_callback BOOLEAN NOT NULL DEFAULT false;
-- New rows default to 0005's rule, for a replica of the previous version still submitting
-- during a rolling upgrade (its connections carry the parameter; this version sets the
-- column). Set apart from ADD COLUMN, so that existing rows are not rewritten.
ALTER TABLE jobs ALTER COLUMN owes_callback
    SET DEFAULT (coalesce(current_setting('ourvidz.callbacks', true), '') = 'on');

-- Jobs still unfinished at the upgrade keep what 0005 would have given them: the service
-- applies its migrations over a direct session with ourvidz.callbacks = 'on' when it has a
-- callback URL.
UPDATE jobs SET owes_callback = true
 WHERE status IN ('queued', 'processing')
   AND coalesce(current_setting('ourvidz.callbacks', true), '') = 'on';

CREATE OR REPLACE FUNCTION ourvidz_owe_callback() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.owes_callback THEN
        INSERT INTO callback_deliveries (job_id, event, webhook_id)
        VALUES (NEW.id, 'job.' || NEW.status, NEW.id::text || '.' || NEW.status)
        ON CONFLICT (webhook_id) DO NOTHING;
    END IF;
    RETURN NULL;
END
$$;
