"""A job's states: ``queued → admitted → running → succeeded | failed | cancelled | pruned``.

``queued`` jobs wait in the database; the dispatcher admits them to the broker when a worker
is free and the tenant's turn has come (fair share, quotas, retry times); a worker then takes
an ``admitted`` job and it is ``running``. ``pruned`` ends a sweep's trial that its pruner
stopped at an epoch boundary: its best epoch's metrics are kept, no model is made.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    ADMITTED = "admitted"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PRUNED = "pruned"


class JobKind(StrEnum):
    """What a job does: ``finetune`` trains a model; ``suggest`` ranks a dataset of
    unlabelled images for labelling with a tuned model (its result: the ranked images)."""

    FINETUNE = "finetune"
    SUGGEST = "suggest"


class SweepStatus(StrEnum):
    """A sweep is ``running`` until its trials are done (``succeeded``: one made a model;
    ``failed``: none did), or it is ``cancelled``."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


WAITING = (JobStatus.QUEUED, JobStatus.ADMITTED)
ACTIVE = (JobStatus.QUEUED, JobStatus.ADMITTED, JobStatus.RUNNING)
TERMINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED,
            JobStatus.PRUNED)
