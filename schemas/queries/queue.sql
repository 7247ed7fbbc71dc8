-- The queue's statements, by name. Loaded by ourvidz_serve.persistence.queries; the
-- repository is the only code that runs them. A statement runs from its "-- name:" line to
-- the next one.
--
-- Every outcome a worker records is fenced by the attempt number it claimed: once a lease
-- has expired and the job was claimed again, the old attempt's writes match no row.
--
-- Every change of a job's status is also an SSE event, sent by the trigger of migration
-- 0006_status_events.sql.
--
-- Each statement makes all its writes (the job and its asset rows) at once, so none needs a
-- transaction of several round trips: the queue's capacity is mostly round trips.

-- name: claim_jobs
-- A queued job near the head of fair order (migration 0008), preferring one whose LoRAs the
-- replica holds (0009), and the later jobs that can share its pipeline call, in fair order,
-- while they fit in $2 free units. The head must fit, so later small jobs never starve a big one.
-- $1 queue, $2 free units, $3 worker id, $4 lease seconds, $5 active adapters (or NULL),
-- $6 the affinity's longest wait in seconds, $7 the window, $8 cached adapters.
WITH head AS (
    -- Adapter affinity, Serve's model multiplexing done in the pull queue: among the first $7
    -- jobs in fair order, the first whose LoRAs are active in the replica's pipeline ($5:
    -- nothing to load; a job with none needs none), then the first whose LoRAs are in its CPU
    -- cache ($8: no download), then the fair head. A job waiting $6 seconds since submission
    -- counts as active: it takes its fair place again. $5 NULL: plain fair order. The window is
    -- an array of ids from one index scan of at most $7 entries on jobs_fair_idx, looked up on
    -- the primary key (a join with it may plan as a scan of the whole queue). Locked after the
    -- sort: SKIP LOCKED passes over a job another replica is claiming, and the status is
    -- checked again on the locked row.
    SELECT id, batch_key, units
      FROM jobs
     WHERE id = ANY (ARRAY(SELECT id
                             FROM jobs
                            WHERE status = 'queued' AND queue = $1
                            ORDER BY virtual_start, id
                            LIMIT $7))
       AND status = 'queued'
     ORDER BY CASE
                WHEN coalesce(adapters <@ $5::text[], true)
                  OR created_at <= clock_timestamp() - make_interval(secs => $6::float8)
                THEN 0
                WHEN adapters <@ $8::text[] THEN 1
                ELSE 2
              END,
              virtual_start, id
     LIMIT 1
       FOR UPDATE SKIP LOCKED
), candidates AS (
    -- The key as a scalar, not a join, so that it is an index condition on
    -- jobs_fair_batch_idx: a rare key must not scan the whole queue.
    SELECT jobs.id, jobs.virtual_start, jobs.units
      FROM jobs
     WHERE jobs.status = 'queued' AND jobs.queue = $1 AND jobs.units <= $2
       AND jobs.batch_key = (SELECT batch_key FROM head WHERE head.units <= $2)
     ORDER BY jobs.virtual_start, jobs.id
     LIMIT $2
       FOR UPDATE OF jobs SKIP LOCKED
), chosen AS (
    SELECT id
      FROM (SELECT id, sum(units) OVER (ORDER BY virtual_start, id) AS running_units
              FROM candidates) AS fitted
     WHERE running_units <= $2
), claimed AS (
    UPDATE jobs
       SET status = 'processing', attempts = attempts + 1, claimed_by = $3, progress = NULL,
           started_at = clock_timestamp(), updated_at = clock_timestamp(),
           lease_expires_at = clock_timestamp() + make_interval(secs => $4)
     WHERE id IN (SELECT id FROM chosen)
    RETURNING {job_columns}
), image_rows AS (
    UPDATE images
       SET status = 'processing', updated_at = clock_timestamp()
      FROM claimed
     WHERE images.job_id = claimed.id
    RETURNING images.job_id, images.id, 'image' AS kind, images.image_index AS idx,
              images.status, coalesce(images.image_url, images.metadata->>'stored_path') AS path,
              images.metadata, images.completed_at
), video_rows AS (
    UPDATE videos
       SET status = 'processing', updated_at = clock_timestamp()
      FROM claimed
     WHERE videos.job_id = claimed.id
    RETURNING videos.job_id, videos.id, 'video' AS kind, 0 AS idx,
              videos.status, coalesce(videos.video_url, videos.metadata->>'stored_path') AS path,
              videos.metadata, videos.completed_at
), asset_rows AS (
    SELECT * FROM image_rows UNION ALL SELECT * FROM video_rows
)
SELECT claimed.*, assets.*
  FROM claimed
 CROSS JOIN LATERAL (
    SELECT array_agg(asset.id ORDER BY asset.idx) AS asset_ids,
           array_agg(asset.kind ORDER BY asset.idx) AS asset_kinds,
           array_agg(asset.idx ORDER BY asset.idx) AS asset_indexes,
           array_agg(asset.status ORDER BY asset.idx) AS asset_statuses,
           array_agg(asset.path ORDER BY asset.idx) AS asset_paths,
           array_agg(asset.metadata ORDER BY asset.idx) AS asset_metadata,
           array_agg(asset.completed_at ORDER BY asset.idx) AS asset_completed_at
      FROM asset_rows AS asset
     WHERE asset.job_id = claimed.id
 ) AS assets;

-- name: heartbeat
-- Extend the leases this worker still holds; returns the ids it holds. A job missing from the
-- answer was reaped (and maybe claimed again): its attempt's outcome will be fenced out.
-- The rows are locked in id order, as record_progress locks them, so the two never deadlock.
-- $1 job ids, $2 their attempts, $3 lease seconds.
WITH held AS (
    SELECT jobs.id
      FROM jobs
      JOIN unnest($1::uuid[], $2::int[]) AS held(id, attempt)
        ON jobs.id = held.id AND jobs.attempts = held.attempt
     WHERE jobs.status = 'processing'
     ORDER BY jobs.id
       FOR UPDATE OF jobs
)
UPDATE jobs
   SET lease_expires_at = clock_timestamp() + make_interval(secs => $3)
  FROM held
 WHERE jobs.id = held.id
RETURNING jobs.id;

-- name: complete_job
-- The job and every asset row, completed, and the GPU seconds it used charged to its user;
-- nothing changes unless every asset has its row.
-- Returns the number of jobs completed: 0 when fenced out or an asset row is missing.
-- $1 job id, $2 attempt, $3 job metadata patch, $4 asset indexes, $5 stored keys,
-- $6 asset metadata patches, $7 GPU seconds to charge.
WITH done AS (
    UPDATE jobs
       SET status = 'completed', metadata = metadata || $3::jsonb, lease_expires_at = NULL,
           completed_at = clock_timestamp(), updated_at = clock_timestamp()
     WHERE id = $1 AND attempts = $2 AND status = 'processing'
       AND cardinality($4::int[]) =
           (SELECT count(*) FROM images WHERE job_id = $1 AND image_index = ANY($4::int[]))
           + (SELECT count(*) FROM videos WHERE job_id = $1)
    RETURNING id, user_id, queue, tier
), charged AS (
    INSERT INTO gpu_usage (job_id, attempt, user_id, queue, tier, gpu_seconds)
    SELECT id, $2, user_id, queue, tier, $7::float8 FROM done
    ON CONFLICT (job_id, attempt) DO NOTHING
), image_rows AS (
    UPDATE images
       SET status = 'completed', image_url = finished.path,
           metadata = images.metadata || finished.patch,
           completed_at = clock_timestamp(), updated_at = clock_timestamp()
      FROM done, unnest($4::int[], $5::text[], $6::jsonb[]) AS finished(idx, path, patch)
     WHERE images.job_id = done.id AND images.image_index = finished.idx
), video_rows AS (
    UPDATE videos
       SET status = 'completed', video_url = ($5::text[])[1],
           thumbnail_url = coalesce(($6::jsonb[])[1]->>'thumbnail_path',
                                    videos.metadata->>'thumbnail_path'),
           metadata = videos.metadata || ($6::jsonb[])[1],
           completed_at = clock_timestamp(), updated_at = clock_timestamp()
      FROM done
     WHERE videos.job_id = done.id
)
SELECT count(*) FROM done;

-- name: job_attempt
-- $1 job id.
SELECT status, attempts FROM jobs WHERE id = $1;

-- name: fail_job
-- The job and its asset rows, failed, and the GPU seconds its attempt used (only what ran)
-- charged. Returns the number of jobs failed (0: fenced out).
-- $1 job id, $2 attempt, $3 error message, $4 job metadata patch, $5 asset metadata patch,
-- $6 GPU seconds to charge.
WITH failed AS (
    UPDATE jobs
       SET status = 'failed', error_message = $3, metadata = metadata || $4::jsonb,
           lease_expires_at = NULL, completed_at = clock_timestamp(),
           updated_at = clock_timestamp()
     WHERE id = $1 AND attempts = $2 AND status = 'processing'
    RETURNING id, user_id, queue, tier
), charged AS (
    INSERT INTO gpu_usage (job_id, attempt, user_id, queue, tier, gpu_seconds)
    SELECT id, $2, user_id, queue, tier, $6::float8 FROM failed WHERE $6::float8 > 0
    ON CONFLICT (job_id, attempt) DO NOTHING
), image_rows AS (
    UPDATE images
       SET status = 'failed', metadata = images.metadata || $5::jsonb,
           updated_at = clock_timestamp()
      FROM failed
     WHERE images.job_id = failed.id
), video_rows AS (
    UPDATE videos
       SET status = 'failed', metadata = videos.metadata || $5::jsonb,
           updated_at = clock_timestamp()
      FROM failed
     WHERE videos.job_id = failed.id
)
SELECT count(*) FROM failed;

-- name: release_job
-- Back to the queue without an outcome (the replica is stopping, e.g. on a rolling update):
-- the attempt is given back, since nothing about the job made it fail. Only a stopping
-- replica releases, after its own call for the job has stopped, so the attempt number it gives
-- back has no writer left; the holder's id fences the release itself, since the next claim
-- reuses the number. A replica stopped after failing its health check keeps the attempt
-- counted ($4 false), so a job that makes its replica unhealthy cannot run for ever.
-- Returns a row when released. $1 job id, $2 attempt, $3 worker id, $4 give the attempt back.
WITH released AS (
    UPDATE jobs
       SET status = 'queued', claimed_by = NULL, lease_expires_at = NULL, started_at = NULL,
           attempts = attempts - CASE WHEN $4::boolean THEN 1 ELSE 0 END, progress = NULL,
           updated_at = clock_timestamp()
     WHERE id = $1 AND attempts = $2 AND claimed_by = $3 AND status = 'processing'
    RETURNING id, queue
), image_rows AS (
    UPDATE images
       SET status = 'queued', updated_at = clock_timestamp()
      FROM released
     WHERE images.job_id = released.id
), video_rows AS (
    UPDATE videos
       SET status = 'queued', updated_at = clock_timestamp()
      FROM released
     WHERE videos.job_id = released.id
)
SELECT pg_notify('{notify_channel}', queue) FROM released;

-- name: reap_expired_leases
-- Jobs whose lease expired (their replica died or hung) go back to the queue, or fail once
-- they used $1 attempts, so a job that kills its replica cannot loop for ever. Idempotent and
-- SKIP LOCKED, so every replica may run it. $1 max attempts, $2 batch limit.
WITH expired AS (
    SELECT id
      FROM jobs
     WHERE status = 'processing' AND lease_expires_at < clock_timestamp()
     ORDER BY lease_expires_at
     LIMIT $2
       FOR UPDATE SKIP LOCKED
), reaped AS (
    UPDATE jobs
       SET status = CASE WHEN attempts >= $1 THEN 'failed' ELSE 'queued' END,
           error_message = CASE WHEN attempts >= $1 THEN format(
               'gave up after %s attempts: each time, the replica running the job stopped '
               'renewing its lease (it crashed, was killed or hung)', attempts) END,
           metadata = CASE WHEN attempts >= $1
                           THEN metadata || '{"error_type": "LeaseExpired"}'::jsonb
                           ELSE metadata END,
           completed_at = CASE WHEN attempts >= $1 THEN clock_timestamp() END,
           started_at = CASE WHEN attempts >= $1 THEN started_at END,
           claimed_by = NULL, lease_expires_at = NULL, updated_at = clock_timestamp()
      FROM expired
     WHERE jobs.id = expired.id
    RETURNING jobs.id, jobs.queue, jobs.status, jobs.attempts, jobs.error_message
), image_rows AS (
    UPDATE images
       SET status = reaped.status, updated_at = clock_timestamp(),
           metadata = CASE WHEN reaped.status = 'failed'
                           THEN images.metadata || jsonb_build_object(
                                'error_type', 'LeaseExpired',
                                'error_message', reaped.error_message)
                           ELSE images.metadata END
      FROM reaped
     WHERE images.job_id = reaped.id
), video_rows AS (
    UPDATE videos
       SET status = reaped.status, updated_at = clock_timestamp(),
           metadata = CASE WHEN reaped.status = 'failed'
                           THEN videos.metadata || jsonb_build_object(
                                'error_type', 'LeaseExpired',
                                'error_message', reaped.error_message)
                           ELSE videos.metadata END
      FROM reaped
     WHERE videos.job_id = reaped.id
)
SELECT id, queue, status, attempts,
       CASE WHEN status = 'queued' THEN pg_notify('{notify_channel}', queue) END AS notified
  FROM reaped;

-- name: queued_units
-- The backlog of a queue in units, counted over at most $2 jobs so that its cost stays flat
-- however long the queue is (the autoscaler needs no more than that).
SELECT coalesce(sum(units), 0)::bigint
  FROM (SELECT units FROM jobs
         WHERE status = 'queued' AND queue = $1
         ORDER BY virtual_start, id
         LIMIT $2) AS head;

-- name: insert_job
-- The job row, in fair order, and a NOTIFY to wake the workers. Its virtual start is the later
-- of the queue's virtual clock and its user's virtual finish, which then advances by the job's
-- expected cost over its tier's weight (migration 0008). A replay of an idempotent submission
-- inserts nothing and advances nothing. Returns no row for a replay.
-- $1 id, $2 user id, $3 job type, $4 format, $5 quality, $6 model type, $7 queue, $8 metadata,
-- $9 project id, $10 video id, $11 image id, $12 idempotency key, $13 request hash,
-- $14 notify channel, $15 batch key, $16 units, $17 owes a callback, $18 tier,
-- $19 expected cost (GPU seconds), $20 the tier's weight, $21 the LoRAs' content digests.
WITH clock AS (
    -- The smallest virtual start in service (the few processing rows, on
    -- jobs_processing_idx: not a batch-mate far ahead in fair order that joined the head's
    -- call); with none running, the queue's head (one index scan on
    -- jobs_fair_idx); an idle queue's clock is the largest virtual finish, so nobody's
    -- history counts after idling. A user with nothing queued thus joins level with the job
    -- in service, ahead of the jobs queued behind it.
    SELECT coalesce(
        (SELECT min(virtual_start) FROM jobs WHERE status = 'processing' AND queue = $7),
        (SELECT virtual_start FROM jobs WHERE status = 'queued' AND queue = $7
          ORDER BY virtual_start, id LIMIT 1),
        (SELECT virtual_finish FROM fair_shares WHERE queue = $7
          ORDER BY virtual_finish DESC LIMIT 1),
        0) AS now
), share AS (
    INSERT INTO fair_shares AS shares (queue, user_id, virtual_finish)
    SELECT $7, $2, clock.now + $19::float8 / $20::float8
      FROM clock
     WHERE $12::text IS NULL
        OR NOT EXISTS (SELECT 1 FROM jobs WHERE user_id = $2 AND idempotency_key = $12)
    ON CONFLICT (queue, user_id) DO UPDATE
       SET virtual_finish = greatest(shares.virtual_finish,
                                     EXCLUDED.virtual_finish - $19::float8 / $20::float8)
                            + $19::float8 / $20::float8,
           updated_at = clock_timestamp()
    RETURNING virtual_finish - $19::float8 / $20::float8 AS virtual_start
), inserted AS (
    INSERT INTO jobs (id, user_id, job_type, format, quality, model_type, queue, metadata,
                      project_id, video_id, image_id, idempotency_key, request_hash, batch_key,
                      units, owes_callback, tier, cost_s, virtual_start, adapters)
    SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $15, $16, $17, $18, $19,
           share.virtual_start, $21::text[]
      FROM share
    ON CONFLICT (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL
    DO NOTHING
    RETURNING {job_columns}
)
SELECT inserted.*, pg_notify($14, inserted.queue) FROM inserted;
