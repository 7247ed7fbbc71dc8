-- Figures GET /metrics reads at scrape time. Loaded by ourvidz_serve.persistence.queries;
-- the repository is the only code that runs them. Each is cheap by construction (an index
-- and a cap) and runs under a statement timeout.

-- name: queue_lengths
-- Jobs waiting in each queue, each count capped at $2 (so its cost is bounded on
-- jobs_fair_idx however long the queue). $1 the queue names.
SELECT q.queue,
       (SELECT count(*)
          FROM (SELECT 1 FROM jobs j
                 WHERE j.queue = q.queue AND j.status = 'queued'
                 LIMIT $2) AS capped) AS waiting
  FROM unnest($1::text[]) AS q(queue);

-- name: jobs_last_hour
-- Jobs submitted in the last hour by job type and current status (on jobs_created_idx).
SELECT job_type, status, count(*) AS jobs
  FROM jobs
 WHERE created_at > now() - interval '1 hour'
 GROUP BY job_type, status;
