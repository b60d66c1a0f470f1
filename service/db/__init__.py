"""Database tables and sessions: the source of truth for datasets, jobs and models."""
