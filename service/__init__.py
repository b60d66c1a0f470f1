"""The HTTP API (FastAPI) over datasets, jobs and tuned models.

Arrives with the service issue; the engine is already usable on its own through ``ftune train``.
"""
