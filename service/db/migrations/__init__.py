"""Alembic migrations of the service's schema; run them with ``ftune db upgrade``."""
