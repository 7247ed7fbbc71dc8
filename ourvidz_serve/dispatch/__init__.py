"""Taking queued jobs from PostgreSQL, running them on the models, recording the outcome."""
