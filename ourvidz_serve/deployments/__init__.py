"""Ray Serve deployments: thin wrappers around the pipelines and the HTTP app."""
