"""The ``ourvidz-serve`` command line (typer + rich; the script's entry point is ``app``).

Users: ``submit`` (with ``--wait`` / ``--output``), ``wait``, ``status``, ``cancel``,
``enhance``, ``job-types``, over the HTTP API. Operators: ``migrate`` and ``plan``.

Commands import what they need when they run, so ``--help`` and light commands stay fast
(the model libraries take seconds to import; the database drivers are only for ``migrate``).

Exit codes: 0 done, 1 failed (an HTTP error, a failed or cancelled job, an unreachable
service; ``plan``: something does not fit), 2 wrong arguments or input.
"""

from __future__ import annotations

from ourvidz_serve.cli import jobs, kuberay, migrate, plan
from ourvidz_serve.cli.common import EXIT_NO, EXIT_OK, EXIT_USAGE, app

__all__ = ["EXIT_NO", "EXIT_OK", "EXIT_USAGE", "app", "jobs", "kuberay", "migrate", "plan"]

if __name__ == "__main__":  # pragma: no cover
    app()
