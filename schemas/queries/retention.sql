-- Retention and per-user data deletion. Loaded by ourvidz_serve.persistence.queries; the
-- repository is the only code that runs them.

-- name: lock_expiring_jobs
-- The retention sweeper's batch: finished jobs not yet expired that ended more than the
-- retention ago, oldest first, locked for this sweeper until its transaction ends. SKIP LOCKED
-- lets sweepers in several replicas take disjoint batches; FOR NO KEY UPDATE still lets
-- callback_deliveries rows reference a locked job.
-- Index: jobs_finished_unexpired_idx (completed_at), partial on exactly this predicate.
-- $1 retention in seconds, $2 batch size.
SELECT id, user_id, job_type, status
  FROM jobs
 WHERE expired_at IS NULL AND status IN ('completed', 'failed', 'cancelled')
   AND completed_at < clock_timestamp() - make_interval(secs => $1::float8)
 ORDER BY completed_at
 LIMIT $2
   FOR NO KEY UPDATE SKIP LOCKED

-- name: files_of_jobs
-- The keys the asset rows of some jobs name: the recorded file (image_url / video_url, set by
-- the completion that won), the video's recorded poster (thumbnail_url), and the planned or
-- last stored key and poster from the metadata. Any of them may be NULL.
-- Index: images (job_id, image_index) unique; videos (job_id) unique.
-- $1 job ids.
SELECT job_id, metadata->>'bucket' AS bucket, image_url AS recorded,
       NULL::text AS recorded_poster,
       metadata->>'stored_path' AS stored_path, metadata->>'thumbnail_path' AS thumbnail_path
  FROM images
 WHERE job_id = ANY($1::uuid[])
UNION ALL
SELECT job_id, metadata->>'bucket', video_url, thumbnail_url,
       metadata->>'stored_path', metadata->>'thumbnail_path'
  FROM videos
 WHERE job_id = ANY($1::uuid[])

-- name: mark_jobs_expired
-- The jobs whose files the sweeper deleted: expired from now on (downloads answer 410). Runs
-- in the transaction that locked them; a job already expired is left as it is.
-- Index: jobs primary key.
-- $1 job ids.
UPDATE jobs
   SET expired_at = clock_timestamp(), updated_at = clock_timestamp()
 WHERE id = ANY($1::uuid[]) AND expired_at IS NULL
RETURNING id

-- name: jobs_with_possible_orphans
-- Finished jobs (not expired) that ended in a recent window, $1 ago to $1 + $2 ago, and may
-- hold files no row names: only a job claimed more than once (an earlier attempt may have
-- stored files and then been fenced out) or one that did not complete (its attempt may have
-- stored files before it was failed or cancelled) can; a job completed by its first attempt
-- cannot. Each sweep looks at the window once, so a job is looked at about once.
-- Index: jobs_finished_unexpired_idx (completed_at), a range scan.
-- $1 seconds since the end (a lease: late uploads of a stale attempt are in), $2 window
-- length in seconds, $3 most jobs.
SELECT id, user_id, job_type, status
  FROM jobs
 WHERE expired_at IS NULL AND status IN ('completed', 'failed', 'cancelled')
   AND completed_at < clock_timestamp() - make_interval(secs => $1::float8)
   AND completed_at >= clock_timestamp() - make_interval(secs => $1::float8 + $2::float8)
   AND attempts > 0 AND (attempts > 1 OR status <> 'completed')
 ORDER BY completed_at
 LIMIT $3

-- name: expired_job
-- Whether a job of this user passed the retention (for a download whose file is gone).
-- Index: jobs primary key.
-- $1 job id, $2 user id.
SELECT job_type, expired_at
  FROM jobs
 WHERE id = $1 AND user_id = $2 AND expired_at IS NOT NULL

-- name: cancel_user_jobs
-- Every queued or running job of a user, and their unfinished asset rows, end 'cancelled' at
-- once, as cancel_job does for one job: the worker holding a running one is told through
-- NOTIFY, its heartbeat no longer holds it, and its own outcome is fenced out (it then deletes
-- the files it stored). Rows are locked in id order, as the heartbeat locks them.
-- Returns one row per job cancelled: its id, job type and the status it had.
-- Index: jobs_user_unfinished_idx (user_id), partial on queued and processing.
-- $1 user id.
WITH target AS (
    SELECT id, status, job_type
      FROM jobs
     WHERE user_id = $1 AND status IN ('queued', 'processing')
     ORDER BY id
       FOR UPDATE
), cancelled AS (
    UPDATE jobs
       SET status = 'cancelled', lease_expires_at = NULL, completed_at = clock_timestamp(),
           updated_at = clock_timestamp()
      FROM target
     WHERE jobs.id = target.id
    RETURNING jobs.id, target.status AS was, target.job_type
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
SELECT id, was, job_type, (SELECT count(*) FROM told) AS told FROM cancelled

-- name: delete_user_jobs
-- A batch of a user's jobs deleted; their images, videos and callback_deliveries rows go with
-- them (ON DELETE CASCADE). Called until it deletes fewer than the batch size.
-- Returns the ids deleted.
-- Index: jobs_user_created_idx (user_id, created_at DESC, id DESC).
-- $1 user id, $2 batch size.
WITH doomed AS (
    SELECT id
      FROM jobs
     WHERE user_id = $1
     ORDER BY created_at DESC, id DESC
     LIMIT $2
       FOR UPDATE
)
DELETE FROM jobs USING doomed WHERE jobs.id = doomed.id
RETURNING jobs.id

-- name: delete_user_records
-- The rest of what is kept about a user: their place in each queue's fair order
-- (fair_shares), the GPU time charged to them (gpu_usage) and their request budget
-- (rate_limits 'user:<uuid>'). Returns how many rows of each went.
-- Index: fair_shares primary key (queue, user_id) through the queue list; gpu_usage_user_idx
-- (user_id, charged_at); rate_limits primary key (subject).
-- $1 user id, $2 every queue name.
WITH shares AS (
    DELETE FROM fair_shares WHERE queue = ANY($2::text[]) AND user_id = $1 RETURNING 1
), usage AS (
    DELETE FROM gpu_usage WHERE user_id = $1 RETURNING 1
), limits AS (
    DELETE FROM rate_limits WHERE subject = 'user:' || $1::uuid::text RETURNING 1
)
SELECT (SELECT count(*) FROM shares) AS fair_shares,
       (SELECT count(*) FROM usage) AS gpu_usage,
       (SELECT count(*) FROM limits) AS rate_limits
