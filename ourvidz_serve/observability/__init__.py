"""Metrics: the families (one table), how they are recorded, and how ``/metrics`` shows them."""
