"""The operator console: static files (``static/``) served by the ingress at ``/console``."""
