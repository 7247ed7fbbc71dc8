"""The jobs feature: request models, planning, the service and its HTTP routes."""
