"""Identity and tenancy: API keys (``keys``), who a request acts as (``principal``), the
per-process key cache (``cache``) and tenants with their quotas (``tenants``).

Keys are random (256 bits), shown once and stored only as their SHA-256: they are
high-entropy, so a fast hash is right (bcrypt's cost would only slow every request).
"""
