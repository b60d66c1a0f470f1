"""Celery workers: run fine-tuning jobs from the queue with the ``models`` engine."""
