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

-- name: gpu_usage_of_user
-- GPU seconds charged to a user in the rolling window (on gpu_usage_user_idx), and the expected
-- cost of their unfinished jobs (on jobs_user_unfinished_idx), which a quota reserves.
-- $1 user id, $2 window seconds.
SELECT (SELECT coalesce(sum(gpu_seconds), 0)::float8
          FROM gpu_usage
         WHERE user_id = $1
           AND charged_at > clock_timestamp() - make_interval(secs => $2)) AS spent,
       (SELECT coalesce(sum(cost_s), 0)::float8
          FROM jobs
         WHERE user_id = $1 AND status IN ('queued', 'processing')) AS reserved

-- name: quota_frees_in
-- Seconds until the window's oldest charges add up to $3 GPU seconds and leave it (NULL: they
-- never do; the unfinished jobs must end and leave the window first).
-- $1 user id, $2 window seconds, $3 GPU seconds needed.
SELECT extract(EPOCH FROM charged_at + make_interval(secs => $2) - clock_timestamp())::float8
  FROM (SELECT charged_at, sum(gpu_seconds) OVER (ORDER BY charged_at, job_id, attempt) AS freed
          FROM gpu_usage
         WHERE user_id = $1
           AND charged_at > clock_timestamp() - make_interval(secs => $2)) AS window_charges
 WHERE freed >= $3
 ORDER BY charged_at
 LIMIT 1
