"""Model replicas pull their work: claim from a PostgreSQL queue, run, store, record.

Nothing here imports Ray: the Serve deployments wrap a :class:`QueueWorker` around a pipeline
runner, and tests run the same worker in-process.
"""
