"""PostgreSQL: the source of truth and the job queue."""
