"""The job lifecycle shared by the API, the reconciler and the workers.

``transitions``: every state change of a job (claim, heartbeat, progress, succeed, requeue,
finish) as a conditional DB write. ``reconciler``: repairs lost and abandoned jobs.
``liveness``: which worker processes are alive. Workers call into this package; it never
calls them.
"""
