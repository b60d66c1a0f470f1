"""The soak-and-chaos harness for two minutes with a fixed seed (bench/soak.py runs it for an
hour): three tenants' mixed workload while every kind of fault strikes at least once, and no
invariant may break. Then the checker must catch violations planted behind the service's back,
so a checker that sees nothing cannot pass."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, func, insert, select

from ftune.service.db.tables import Dataset, Job, JobEvent, TunedModel
from ftune.service.events import EventKind
from ftune.service.ids import new_id
from ftune.testing.soak.faults import FAULT_KINDS
from ftune.testing.soak.harness import Soak, SoakOptions
from ftune.testing.soak.report import SoakResult, final_line, summary
from ftune.testing.soak.resources import ResourceSampler, Sample

pytestmark = [pytest.mark.processes, pytest.mark.slow]
SEED = 31


@pytest.fixture(scope="module")
def soak(tmp_path_factory) -> Iterator[tuple[Soak, SoakResult]]:
    options = SoakOptions(work=tmp_path_factory.mktemp("soak"), minutes=2, seed=SEED)
    with Soak(options) as running:
        result = running.run()
        print(summary(result), final_line(result), sep="\n")
        yield running, result


def test_two_minutes_of_faults_break_no_invariant(soak):
    _, result = soak
    assert result.harness_errors == [], result.harness_errors
    assert set(result.journal.faults_by_kind()) == set(FAULT_KINDS)
    assert result.requests > 200
    assert result.jobs_by_state["succeeded"] > 0
    assert result.violations == [], summary(result)


def _new_violations(soak_run: Soak, plant) -> list[str]:
    """What the checker reports after ``plant`` that it did not before."""
    journal = soak_run.journal
    before = len(journal.violations)
    plant()
    soak_run.checker.grace_s = 0  # what was planted is old enough to judge at once
    soak_run.checker.check()
    return [f"{v.invariant}: {v.detail}" for v in journal.violations[before:]]


def _writer(soak_run: Soak):
    return create_engine(soak_run.stack.database_url)


def test_the_checker_finds_an_object_deleted_behind_the_service(soak):
    soak_run, _ = soak
    with _writer(soak_run).connect() as db:
        dataset = db.scalar(select(Dataset.id).where(Dataset.blob_sha256.is_not(None)))
    assert dataset is not None, "the soak left no dataset to plant on"
    blob = soak_run.stack.home / "blobs" / "datasets" / dataset / "images.tar"
    found = _new_violations(soak_run, blob.unlink)
    assert any(f"dataset {dataset}'s row has no" in v for v in found), found


def test_a_delete_without_a_clear_answer_may_have_gone_through(soak):
    """A DELETE that got no answer or a 5xx (the database dropped the connection around its
    commit) may have been done: a later 404 for that object is no violation, while a 404
    for an object never deleted still is."""
    import threading

    from ftune.testing.soak.workload import TenantActor

    soak_run, _ = soak
    state = soak_run.tenants.states[0]
    actor = TenantActor(state, soak_run.tenants, soak_run.stack.api_url, soak_run.data,
                        soak_run.journal, SEED, threading.Event())
    unanswered, behind = new_id(), new_id()  # ids no dataset has: GET answers 404
    for dataset in (unanswered, behind):
        state.add("datasets", dataset)
    state.perhaps_removed("datasets", unanswered)
    before = len(soak_run.journal.violations)
    for dataset in (unanswered, behind):
        response = actor.api.request("GET", f"/v1/datasets/{dataset}", "/v1/datasets/{id}")
        assert response is not None and response.status_code == 404
        actor._vanished("datasets", dataset, response)
    found = [v.detail for v in soak_run.journal.violations[before:]]
    assert len(found) == 1 and behind in found[0], found
    assert unanswered not in state.live("datasets") and behind in state.live("datasets")
    actor.api.close()


def test_the_checker_finds_an_object_without_its_row(soak):
    soak_run, _ = soak
    orphan = soak_run.stack.home / "blobs" / "models" / new_id() / "bundle.tar"

    def plant() -> None:
        orphan.parent.mkdir(parents=True)
        orphan.write_bytes(b"no row points here")
        old = time.time() - 3600
        os.utime(orphan, (old, old))
        os.utime(orphan.parent, (old, old))

    found = _new_violations(soak_run, plant)
    assert any(f"models/{orphan.parent.name}/ is in the store with no" in v for v in found), found


def test_the_checker_finds_an_epoch_recorded_twice(soak):
    soak_run, _ = soak
    engine, events = _writer(soak_run), JobEvent.__table__
    with engine.connect() as db:
        job_id = db.scalar(select(Job.id).where(Job.status == "succeeded", Job.attempts == 1,
                                                Job.epoch >= 1))
        assert job_id is not None, "the soak left no succeeded job to plant on"
        event = dict(db.execute(select(events).where(
            events.c.job_id == job_id, events.c.kind == EventKind.EPOCH)).mappings().first())

    def plant() -> None:
        """A copy of the job's epoch event, numbered after its last one."""
        copy = {name: value for name, value in event.items() if name != "id"}
        with engine.begin() as db:
            if "seq" in copy:
                copy["seq"] = 1 + db.scalar(select(func.max(events.c.seq)).where(
                    events.c.job_id == job_id))
            db.execute(insert(events).values(**copy))

    found = _new_violations(soak_run, plant)
    epoch = event["data"]["epoch"]
    assert any(f"job {job_id}'s epoch {epoch} recorded 2 times" in v for v in found), found


def test_the_capacity_answers_the_checker_accepts_are_the_service_s_own():
    """The checker tells a declared capacity's 503 from an outage by its words: they must be
    the service's (a reworded answer would make every such 503 a violation, or hide one)."""
    from pathlib import Path

    from ftune.testing.soak.api import AT_CAPACITY

    service = Path(__file__).parent.parent / "service"
    sources = " ".join(p.read_text() for p in service.rglob("*.py"))
    assert all(phrase in sources for phrase in AT_CAPACITY)


def test_memory_held_by_a_bounded_cache_is_not_judged_a_leak_but_other_growth_is():
    """A cache filling to its bound grows RSS; the judged slope is of RSS less what the
    process reports it holds, so a leak beside the cache still shows."""
    sampler = ResourceSampler(lambda: {}, threading.Event())
    for minute in range(30):
        cache = min(minute, 20) * 4.0  # fills to 80 MB, then stays
        leak = minute * 0.5  # 30 MB/h of memory nothing accounts for
        sampler.samples.append(Sample(minute * 60.0, "api", 1, 200 + cache + leak, 10,
                                      held_mb=cache))
    found = sampler.slopes("api", after=-1.0)
    assert found.rss_mb_per_h is not None and found.rss_mb_per_h > 150
    assert found.unheld_mb_per_h == pytest.approx(30.0)


def test_a_delete_committed_after_the_checkers_first_look_is_no_orphan(soak):
    """Found by the hour-long soak (four false orphans): the checker read every pending
    deletion's time as None (a zone-aware time was dropped), and its one look at them was
    taken before walking the store. A model deleted meanwhile (row gone, deletion scheduled,
    files not yet removed) is judged from fresh reads; a real orphan is still found."""
    from ftune.service.db.tables import BlobDeletion

    soak_run, _ = soak
    checker, journal = soak_run.checker, soak_run.journal

    def planted() -> str:
        bundle = soak_run.stack.home / "blobs" / "models" / new_id() / "bundle.tar"
        bundle.parent.mkdir(parents=True)
        bundle.write_bytes(b"no row points here")
        return f"models/{bundle.parent.name}/"

    before = len(journal.violations)
    orphan = planted()  # nothing scheduled: an orphan
    checker.orphan_unless_deleted(orphan, TunedModel.id, horizon=time.time() + 60)
    found = [v.detail for v in journal.violations[before:]]
    assert len(found) == 1 and f"{orphan} is in the store with no" in found[0], found
    assert "nothing scheduled" in found[0]
    deleted = planted()  # what a delete's transaction leaves: no row, a deletion scheduled
    with _writer(soak_run).begin() as db:
        db.execute(insert(BlobDeletion).values(prefix=deleted))
    checker.orphan_unless_deleted(deleted, TunedModel.id, horizon=time.time() - 60)
    assert len(journal.violations) == before + 1, journal.violations[-1].detail  # being removed
    with _writer(soak_run).begin() as db:  # the upkeep removes what was planted
        db.execute(insert(BlobDeletion).values(prefix=orphan))
