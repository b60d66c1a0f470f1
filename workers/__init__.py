"""Celery workers that run the fine-tuning engine (``models``) for queued jobs.

Arrives with the service issue; the engine is already usable on its own through ``ftune train``.
"""
