"""Defences against hostile input: reference URLs, images, prompts. No Ray, no database."""
