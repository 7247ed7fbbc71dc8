-- The callback outbox. Loaded by ourvidz_serve.persistence.queries; the repository is the only
-- code that runs them.

-- name: claim_callbacks
-- Due deliveries, each locked for $2 seconds by this deliverer and its attempt counted.
-- $1 most rows, $2 lock seconds.
UPDATE callback_deliveries
   SET attempts = attempts + 1,
       locked_until = clock_timestamp() + make_interval(secs => $2)
 WHERE id IN (
    SELECT id FROM callback_deliveries
     WHERE status = 'pending' AND next_attempt_at <= clock_timestamp()
       AND (locked_until IS NULL OR locked_until < clock_timestamp())
     ORDER BY next_attempt_at
     LIMIT $1
       FOR UPDATE SKIP LOCKED
 )
RETURNING id, job_id, event, webhook_id, attempts

-- name: record_callback_attempt
-- One attempt's outcome, fenced by its attempt number: delivered, given up, or due again in
-- $4 seconds. $1 id, $2 attempt, $3 outcome ('delivered', 'failed' or 'pending'),
-- $4 seconds to the next attempt, $5 the attempt's record (JSON).
UPDATE callback_deliveries
   SET status = $3,
       next_attempt_at = clock_timestamp() + make_interval(secs => $4),
       locked_until = NULL,
       history = history || jsonb_build_array($5::jsonb),
       delivered_at = CASE WHEN $3 = 'delivered' THEN clock_timestamp() END
 WHERE id = $1 AND attempts = $2

-- name: callback_deliveries_of_job
-- $1 job id.
SELECT event, webhook_id, status, attempts, next_attempt_at, history, delivered_at
  FROM callback_deliveries
 WHERE job_id = $1
 ORDER BY created_at
