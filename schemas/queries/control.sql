-- Job control: cancellation and progress. Loaded by ourvidz_serve.persistence.queries; the
-- repository is the only code that runs them.

-- name: cancel_job
-- A queued or running job and its unfinished asset rows end 'cancelled' at once; for a
-- running one, the worker holding it is told through NOTIFY (and its next heartbeat no longer
-- holds it), and its own outcome is fenced out since the job is no longer 'processing'.
-- Returns the status the job had (NULL: no such job).
-- $1 job id.
WITH target AS (
    SELECT id, status FROM jobs WHERE id = $1 FOR UPDATE
), cancelled AS (
    UPDATE jobs
       SET status = 'cancelled', lease_expires_at = NULL, completed_at = clock_timestamp(),
           updated_at = clock_timestamp()
      FROM target
     WHERE jobs.id = target.id AND target.status IN ('queued', 'processing')
    RETURNING jobs.id, target.status AS was
), image_rows AS (
    UPDATE images
       SET status = 'cancelled', updated_at = clock_timestamp()
      FROM cancelled
     WHERE images.job_id = cancelled.id AND images.status IN ('queued', 'processing')
), video_rows AS (
    UPDATE videos
       SET status = 'cancelled', updated_at = clock_timestamp()
      FROM cancelled
     WHERE videos.job_id = cancelled.id AND videos.status IN ('queued', 'processing')
), told AS (
    SELECT pg_notify('{cancel_channel}', id::text) FROM cancelled WHERE was = 'processing'
)
SELECT (SELECT status FROM target) AS was, (SELECT count(*) FROM told) AS told

-- name: record_progress
-- The latest step of each running job, fenced by attempt. One statement for every job a
-- worker runs, so a batch's progress costs one round trip per flush.
-- Each recorded step is also an SSE 'progress' event.
-- The rows are locked in id order, as the heartbeat locks them, so the two never deadlock.
-- $1 job ids, $2 attempts, $3 steps, $4 totals.
WITH running AS (
    SELECT jobs.id, p.step, p.total
      FROM jobs
      JOIN unnest($1::uuid[], $2::int[], $3::int[], $4::int[]) AS p(id, attempt, step, total)
        ON jobs.id = p.id AND jobs.attempts = p.attempt
     WHERE jobs.status = 'processing'
     ORDER BY jobs.id
       FOR UPDATE OF jobs
), recorded AS (
    UPDATE jobs
       SET progress = jsonb_build_object('step', running.step, 'total', running.total,
                                         'at', clock_timestamp())
      FROM running
     WHERE jobs.id = running.id
    RETURNING jobs.id, running.step, running.total
)
SELECT pg_notify('{events_channel}',
                 json_build_object('job', id, 'type', 'progress', 'step', step,
                                   'total', total)::text)
  FROM recorded

-- name: record_cancelled_stop
-- Where the cancelled attempt's pipeline call stopped, kept in the job's metadata, and the GPU
-- seconds it ran charged (fenced by the attempt that ran: a re-run's job is never touched).
-- Returns the number of jobs recorded. $1 job id, $2 attempt, $3 metadata patch,
-- $4 GPU seconds to charge.
WITH stopped AS (
    UPDATE jobs
       SET metadata = metadata || $3::jsonb, updated_at = clock_timestamp()
     WHERE id = $1 AND attempts = $2 AND status = 'cancelled'
    RETURNING id, user_id, queue, tier
), charged AS (
    INSERT INTO gpu_usage (job_id, attempt, user_id, queue, tier, gpu_seconds)
    SELECT id, $2, user_id, queue, tier, $4::float8 FROM stopped WHERE $4::float8 > 0
    ON CONFLICT (job_id, attempt) DO NOTHING
)
SELECT count(*) FROM stopped

-- name: publish_asset_stored
-- An SSE 'asset' event: one file of a running attempt is in storage (fenced by attempt).
-- $1 job id, $2 attempt, $3 asset index, $4 bucket, $5 key.
SELECT pg_notify('{events_channel}',
                 json_build_object('job', id, 'type', 'asset', 'index', $3::int,
                                   'bucket', $4::text, 'path', $5::text)::text)
  FROM jobs
 WHERE id = $1 AND attempts = $2 AND status = 'processing'
