-- Fair order, queues and usage as the API shows them. Loaded by
-- ourvidz_serve.persistence.queries; the repository is the only code that runs them.

-- name: queue_overview
-- Per queue and tier: queued jobs, their expected GPU seconds and the oldest one's arrival,
-- over at most $2 queued jobs per queue (read in fair order on jobs_fair_idx, so the cost is
-- flat however deep the backlog; beyond the cap the figures are lower bounds), and the
-- running jobs (on jobs_processing_idx: only processing rows).
-- $1 queue names, $2 cap per queue.
WITH queued AS (
    SELECT q.queue, j.tier, count(*) AS queued, sum(j.cost_s) AS backlog_s,
           min(j.created_at) AS oldest
      FROM unnest($1::text[]) AS q(queue)
     CROSS JOIN LATERAL (
        SELECT tier, cost_s, created_at FROM jobs
         WHERE status = 'queued' AND queue = q.queue
         ORDER BY virtual_start, id
         LIMIT $2
     ) AS j
     GROUP BY q.queue, j.tier
), running AS (
    SELECT queue, tier, count(*) AS running
      FROM jobs
     WHERE status = 'processing' AND queue = ANY($1::text[])
     GROUP BY queue, tier
)
SELECT coalesce(queued.queue, running.queue) AS queue,
       coalesce(queued.tier, running.tier) AS tier,
       coalesce(queued.queued, 0) AS queued,
       coalesce(running.running, 0) AS running,
       coalesce(queued.backlog_s, 0)::float8 AS backlog_s,
       extract(EPOCH FROM clock_timestamp() - queued.oldest)::float8 AS oldest_wait_s
  FROM queued
  FULL JOIN running ON running.queue = queued.queue AND running.tier = queued.tier
 ORDER BY 1, 2

-- name: replicas_at_work
-- Per queue, the replicas holding a job's lease (on jobs_processing_idx: only processing rows):
-- replicas demonstrably pulling work, whatever state Serve reports them in.
-- $1 queue names.
SELECT queue, count(DISTINCT claimed_by) AS replicas
  FROM jobs
 WHERE status = 'processing' AND queue = ANY($1::text[])
 GROUP BY queue

-- name: queue_position
-- How many queued jobs come before a job in its queue's fair order, and their expected GPU
-- seconds, counted over at most $4 of them (an index-only range scan on jobs_fair_idx).
-- $1 queue, $2 the job's virtual start, $3 its id, $4 cap.
SELECT count(*) AS ahead, coalesce(sum(cost_s), 0)::float8 AS ahead_s
  FROM (SELECT cost_s FROM jobs
         WHERE status = 'queued' AND queue = $1 AND (virtual_start, id) < ($2, $3)
         ORDER BY virtual_start, id
         LIMIT $4) AS before
