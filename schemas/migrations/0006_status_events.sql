-- Every change of a job's status is an SSE 'status' event: one trigger sends it, whichever
-- statement makes the change (claim, complete, fail, cancel, release, reap), in the same
-- transaction, so it is delivered at commit. Released migrations are never edited.
CREATE FUNCTION ourvidz_status_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('ourvidz_job_events',
                      json_build_object('job', NEW.id, 'type', 'status',
                                        'status', NEW.status)::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_status_event
    AFTER UPDATE OF status ON jobs
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION ourvidz_status_event();
