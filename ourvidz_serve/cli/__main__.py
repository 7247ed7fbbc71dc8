"""``python -m ourvidz_serve.cli``."""

from ourvidz_serve.cli import app

app()
