"""The HTTP front: app factory, authentication, error mapping and the small routes."""
