"""The SQL as package data: pyproject.toml maps the package ``ourvidz_serve._sql`` onto this
folder, so a wheel ships ``migrations/*.sql`` and ``queries/*.sql`` inside the package and an
editable install reads them here. ``ourvidz_serve.persistence`` finds them with
``importlib.resources``. Nothing to import: this file only makes the folder a package."""
