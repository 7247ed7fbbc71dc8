-- Rate limits and caps that hold across ingress replicas. Loaded by
-- ourvidz_serve.persistence.queries; the repository is the only code that runs them.

-- name: take_rate_token
-- GCRA (a token bucket kept as one timestamp): a request is allowed when the subject's
-- theoretical arrival time, pushed one interval further, is at most burst intervals ahead
-- of now. Returns whether it was allowed and, if not, the seconds until one would be: NULL
-- when the row was written by a transaction this statement's snapshot cannot see yet.
-- $1 subject, $2 emission interval (seconds per request), $3 burst (requests).
WITH taken AS (
    INSERT INTO rate_limits AS limits (subject, tat)
    VALUES ($1, clock_timestamp() + make_interval(secs => $2))
    ON CONFLICT (subject) DO UPDATE
       SET tat = greatest(limits.tat, clock_timestamp()) + make_interval(secs => $2)
     WHERE greatest(limits.tat, clock_timestamp()) + make_interval(secs => $2)
           <= clock_timestamp() + make_interval(secs => $2 * $3)
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM taken) AS allowed,
       (SELECT extract(EPOCH FROM greatest(tat, clock_timestamp())
                                  + make_interval(secs => $2 - $2 * $3)
                                  - clock_timestamp())::float8
          FROM rate_limits WHERE subject = $1) AS wait_s

-- name: lock_user_submissions
-- Serializes one user's submissions until the transaction ends, so that two ingress replicas
-- cannot both admit the job that fills the queued-jobs cap.
-- $1 user id.
SELECT pg_advisory_xact_lock(hashtextextended('ourvidz-submit:' || $1::uuid::text, 0))

-- name: queued_jobs_of_user
-- $1 user id, $2 stop counting here (the cap).
SELECT count(*) FROM (SELECT 1 FROM jobs WHERE user_id = $1 AND status = 'queued' LIMIT $2) AS q
