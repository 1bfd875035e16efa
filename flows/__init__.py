"""Prefect flows: they only wire the stages in `tasks/` (see flows/pipeline.py)."""
