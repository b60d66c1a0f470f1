"""Sweep service functions behind the routes. Every function acts for a principal: another
tenant's sweep is a 404."""

from __future__ import annotations

import logging
from collections.abc import Callable

import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ftune.models.recipe.resolve import image_passes, resolve_static
from ftune.models.spec import FineTuneSpec
from ftune.models.task_checks import MULTI_LABEL
from ftune.service.auth.principal import Principal, Role
from ftune.service.auth.tenancy import get_visible, visible_rows
from ftune.service.backbones import check_backbone
from ftune.service.datasets import get_dataset
from ftune.service.db.session import Database
from ftune.service.db.tables import Dataset, Sweep, Tenant, utcnow
from ftune.service.errors import Conflict, InvalidInput, TooManyRequests, Unavailable
from ftune.service.events import EventKind, add_event
from ftune.service.idempotency import create_once
from ftune.service.job_status import SweepStatus
from ftune.service.jobs import (
    MEMBER_MAX_PRIORITY,
    check_devices_cap,
    check_task,
    dataset_stats,
    request_cancel,
    unlabeled_dataset,
    validate_job_spec,
)
from ftune.service.pages import DEFAULT_LIMIT, Keyset, read_page
from ftune.service.quotas import check_job, limits_of, usage_of
from ftune.service.schemas import SweepIn
from ftune.service.settings import Settings
from ftune.service.sweeps.controller import best_trial, planned_trials
from ftune.service.sweeps.space import check_space, parse_space
from ftune.service.sweeps.study import DIRECTIONS, grid_size
from ftune.service.sweeps.trials import Trial, load_trials
from ftune.service.tuned_models import set_alias

log = logging.getLogger(__name__)
# Sweeps' Idempotency-Keys share the jobs' table under this prefix, so a key used for a job
# and the same key used for a sweep never meet.
SWEEP_KEYS = "sweep:"


def create_sweep(session: Session, principal: Principal, settings: Settings, *,
                 request: SweepIn) -> Sweep:
    """A running sweep; its first trials start at the next dispatch. 422 names a bad path or
    distribution in the space, before anything runs."""
    if request.priority > MEMBER_MAX_PRIORITY:
        principal.require(Role.ADMIN, f"priority above {MEMBER_MAX_PRIORITY}")
    base = validate_job_spec(request.base)
    check_backbone(base, settings)
    params = parse_space(request.space)
    if request.sampler == "grid" and grid_size(params) is None:
        raise InvalidInput("sampler: grid needs every parameter to be a choice or a short int "
                           "range; use tpe or random for continuous ones", loc=["sampler"])
    dataset = get_dataset(session, principal, request.dataset_id)

    def check_trial(spec: dict) -> None:  # what a trial's spec must pass besides validation
        parsed = validate_job_spec(spec)
        check_backbone(parsed, settings)
        check_devices_cap(parsed, settings)
        unlabeled_dataset(session, principal, dataset, parsed, None)
        if check_task(parsed, dataset) != MULTI_LABEL and request.objective == "val_map":
            raise InvalidInput("objective: val_map (mean average precision) is for "
                               "multi-label jobs; use val_accuracy or val_loss",
                               loc=["objective"])

    try:
        check_trial(request.base)
    except InvalidInput as exc:  # name the field as the sweep's body has it
        raise InvalidInput("base." + exc.detail.removeprefix("spec.")) from exc
    check_space(request.base, params, check_trial, request.seed)
    _check_has_validation(dataset, request, params)
    _check_room(session, settings, dataset, base)
    sweep = Sweep(tenant_id=dataset.tenant_id, dataset_id=dataset.id, status=SweepStatus.RUNNING,
                  base=request.base, space=request.space, objective=request.objective,
                  n_trials=request.n_trials, parallelism=request.parallelism,
                  pruner=request.pruner, sampler=request.sampler,
                  max_total_s=request.max_total_s, seed=request.seed,
                  priority=request.priority, model_name=request.model_name)
    session.add(sweep)
    session.flush()
    add_event(session, sweep.id, EventKind.STATUS, status=sweep.status)
    return sweep


def _check_has_validation(dataset: Dataset, request: SweepIn, params: list) -> None:
    """The objective is measured on validation images: the data must have some."""
    if (dataset.splits or {}).get("val"):
        return
    fractions = [request.base.get("val_fraction", 0.2)]
    fractions += [v for p in params if p.path == "val_fraction" for v in p.test_values()]
    if any(not fraction for fraction in fractions):
        raise InvalidInput("base.val_fraction: the objective is measured on validation "
                           "images; this dataset has no val split, so val_fraction must be "
                           "above 0 in every trial", loc=["base", "val_fraction"])


def _check_room(session: Session, settings: Settings, dataset: Dataset,
                base: FineTuneSpec) -> None:
    running = session.scalar(select(func.count()).select_from(Sweep).where(
        Sweep.tenant_id == dataset.tenant_id, Sweep.status == SweepStatus.RUNNING)) or 0
    if running >= settings.max_running_sweeps:
        raise TooManyRequests(f"{running} sweeps are running, the most a tenant may run at "
                              f"once (FTUNE_MAX_RUNNING_SWEEPS={settings.max_running_sweeps}); "
                              "cancel one or wait", retry_after_s=60)
    # The job quotas a trial meets, checked once now: a sweep that could never start a trial
    # is refused instead of waiting forever.
    resolved = resolve_static(base, dataset_stats(dataset, base))
    check_job(usage_of(session, dataset.tenant_id),
              limits_of(session.get(Tenant, dataset.tenant_id), settings),
              epochs=image_passes(base, resolved), images=dataset.num_images)


def get_sweep(session: Session, principal: Principal, sweep_id: str) -> Sweep:
    """The sweep, if the principal may see it; another tenant's is a 404."""
    return get_visible(session, principal, Sweep, sweep_id, noun="sweep")


def list_sweeps(session: Session, principal: Principal, *, limit: int = DEFAULT_LIMIT,
                cursor: str | None = None) -> tuple[list[dict], str | None]:
    """Newest first, a page at a time."""
    sweeps, next_cursor = read_page(session, visible_rows(principal, Sweep),
                                    Keyset(Sweep.created_at, Sweep.id),
                                    limit=limit, cursor=cursor)
    return [sweep_view(sweep, load_trials(session, sweep, with_metrics=False))
            for sweep in sweeps], next_cursor


def submit_sweep(db: Database, principal: Principal, settings: Settings, *,
                 request: SweepIn, idempotency_key: str | None,
                 dispatch: Callable[[], object]) -> str:
    """Record a running sweep and ask the dispatcher to start its first trials now, not at
    its next periodic round; returns the sweep's id (an earlier sweep's, when the
    idempotency key was seen with the same request). An unreachable queue only delays the
    trials: the dispatcher starts them once it is back."""
    sweep = create_once(db, principal, key=idempotency_key, prefix=SWEEP_KEYS,
                        body=request.model_dump(mode="json"),
                        create=lambda session: create_sweep(session, principal, settings,
                                                            request=request).id)
    try:
        dispatch()
    except (redis.RedisError, Unavailable):
        log.warning("sweep %s: the queue is unreachable; its trials start once it is back",
                    sweep.object_id)
    return sweep.object_id


def trial_view(trial: Trial, objective: str) -> dict:
    job = trial.job
    value = (job.best or {}).get(objective)
    return {"number": trial.row.number, "job_id": job.id, "params": trial.row.params,
            "status": job.status, "value": value, "epoch": job.epoch, "epochs": job.epochs,
            "pruned": job.status == "pruned", "model_id": job.model_id}


def sweep_view(sweep: Sweep, trials: list[Trial]) -> dict:
    best = best_trial(trials, sweep.objective)
    return {
        "id": sweep.id, "tenant_id": sweep.tenant_id, "dataset_id": sweep.dataset_id,
        "status": sweep.status, "reason": sweep.reason, "base": sweep.base,
        "space": sweep.space, "objective": sweep.objective,
        "direction": DIRECTIONS[sweep.objective], "n_trials": planned_trials(sweep),
        "parallelism": sweep.parallelism, "pruner": sweep.pruner, "sampler": sweep.sampler,
        "max_total_s": sweep.max_total_s, "seed": sweep.seed, "created_at": sweep.created_at,
        "finished_at": sweep.finished_at,
        "trials": [trial_view(t, sweep.objective) for t in trials],
        "best_trial": trial_view(best, sweep.objective) if best else None,
        "epochs_run": sum(t.job.epoch for t in trials),
        "epochs_asked": sum(max(t.job.epochs, t.job.epoch) for t in trials),
    }


def cancel_sweep(session: Session, principal: Principal, *, sweep_id: str) -> Sweep:
    """No more trials start; waiting trials are cancelled, running ones stop at their next
    batch. Cancelling an ended sweep is a 409."""
    sweep = get_sweep(session, principal, sweep_id)
    if sweep.status != SweepStatus.RUNNING:
        raise Conflict(f"sweep {sweep_id} already {sweep.status}; nothing to cancel")
    for trial in load_trials(session, sweep, with_metrics=False, for_update=True):
        request_cancel(session, trial.job)
    sweep.status, sweep.cancel_requested = SweepStatus.CANCELLED, True
    sweep.reason, sweep.finished_at = "cancelled", utcnow()
    add_event(session, sweep.id, EventKind.STATUS, status=sweep.status, reason=sweep.reason)
    return sweep


def promote_sweep(session: Session, principal: Principal, *, sweep_id: str, alias: str
                  ) -> dict:
    """Point ``alias`` at the best trial's model (within the model's name)."""
    sweep = get_sweep(session, principal, sweep_id)
    best = best_trial(load_trials(session, sweep, with_metrics=False), sweep.objective)
    if best is None or best.job.model_id is None:
        raise Conflict(f"sweep {sweep_id} has no finished trial with a model yet")
    row = set_alias(session, principal, alias=alias, ref=best.job.model_id)
    return {"alias": f"{row.name}:{row.alias}", "model_id": row.model_id,
            "trial": best.row.number}

