"""Soak and chaos: three tenants run a mixed workload (uploads good, duplicate and hostile;
tiny jobs, cancels and sweeps; predictions; downloads in every format; deletes) with an
operator revoking keys and changing quotas, while faults drawn from the seed strike: a worker
SIGKILLed and restarted, the API restarted, Redis restarted empty, the database restarted
(PostgreSQL) or write-locked (SQLite), the disk nearly full, slow clients holding
connections. A checker tests the service's invariants throughout and at the end.

    python bench/soak.py --minutes 60 --seed 7 [--database sqlite|postgresql]

Prints a summary (requests by route and status, faults by kind, jobs by final state, every
violation with the operations that led to it, memory and descriptor slopes, GET /v1/jobs/{id}
latency outside and during faults), then one line:
soak minutes=… seed=… requests=… violations=N jobs=… faults=… mem_slope_mb_per_h=…
raw_rss_slope_mb_per_h=… fd_slope_per_h=… p50_ms=… p99_ms=…  (target: violations=0; the
memory slope is of RSS less the API's model cache, which has a bound of its own). Exits 1
when violations > 0."""

from __future__ import annotations

import argparse
import faulthandler
import signal
import sys
import tempfile
from pathlib import Path

from ftune.testing.soak.harness import Soak, SoakOptions
from ftune.testing.soak.report import final_line, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None,
                        help="where the stack's data and logs go (default: a new temporary "
                        "folder, kept for reading the logs)")
    args = parser.parse_args()
    faulthandler.register(signal.SIGUSR1)  # kill -USR1 PID: where every thread is now
    signal.signal(signal.SIGTERM, _stop)  # `kill PID` tears the stack down too
    work = args.work or Path(tempfile.mkdtemp(prefix="ftune-soak-"))
    options = SoakOptions(work=work, minutes=args.minutes, seed=args.seed,
                          database=args.database, workers=args.workers)
    with Soak(options) as soak:
        result = soak.run()
    print(summary(result))
    print(f"logs: {work / 'logs'}")
    print(final_line(result))
    return 1 if result.violations else 0


def _stop(signum: int, _frame: object) -> None:
    """SIGTERM ends the run as Ctrl-C does, through the stack's own teardown: its
    PostgreSQL cluster, Redis and processes would outlive it otherwise."""
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
