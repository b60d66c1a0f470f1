"""One rank of a data-parallel run, started by torchrun (``launch.py``):
``python -m ftune.models.parallel.rank_main LAUNCH_JSON``.

Every rank runs ``fit`` on its device in the process group torchrun set up. Rank 0 relays
its callbacks to the launcher and, when the run ends, saves the result for it; the others
end once the epochs are trained (``ShareDone``). An exception is saved for the launcher too,
so the job fails (or is retried) for the reason the rank had.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ftune.models.derived.store import DerivedStore
from ftune.models.parallel import channel, ranks
from ftune.models.settings import EngineSettings, configure
from ftune.models.training.fit import fit
from ftune.models.training.run_setup import Callbacks

# A collective waits this long for a slow rank (rank 0 storing a large checkpoint over a
# slow link, say) before the group gives up; a rank that dies ends the group at once.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


def error_path(folder: Path, rank: int) -> Path:
    return folder / f"error-rank{rank}.pickle"


def result_path(folder: Path) -> Path:
    return folder / "result.pt"


def _save_error(folder: Path, rank: int, exc: BaseException) -> None:
    try:
        data = pickle.dumps(exc)
        pickle.loads(data)  # some exceptions pickle but cannot be rebuilt
    except Exception:
        data = pickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}"))
    error_path(folder, rank).write_bytes(data)


def _device(kind: str) -> tuple[str, str]:
    """This rank's device and the backend that reduces on it."""
    if kind == "cuda":
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        return f"cuda:{local}", "nccl"
    return "cpu", "gloo"


def main(launch_file: str) -> int:
    # synced.py's differentiable all-reduce: its replacement has no autograd (torch 2.14).
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message="torch.distributed.nn.functional.all_reduce is deprecated")
    launch = json.loads(Path(launch_file).read_text())
    folder = Path(launch["folder"])
    configure(EngineSettings(**launch["engine"]))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    device, backend = _device(launch["device_kind"])
    dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    rank = dist.get_rank()
    relay = None
    callbacks = Callbacks()
    if rank == 0:
        relay = channel.RelayedCallbacks(channel.connect(channel.Endpoint.from_dict(
            launch["endpoint"])))
        callbacks = relay.callbacks()
        logging.getLogger("ftune").addHandler(channel.RelayedLogs(relay))
        logging.getLogger("ftune").setLevel(logging.INFO)
    derived = launch.get("derived")
    try:
        result = fit(launch["data"], launch["spec"], checkpoint_dir=launch["checkpoint_dir"],
                     resume=launch.get("resume"), callbacks=callbacks, device=device,
                     cache_features=launch["cache_features"], resolved=launch["resolved"],
                     time_limit_s=launch.get("time_limit_s"),
                     derived=None if derived is None else DerivedStore(
                         Path(derived["root"]), int(derived["max_bytes"])),
                     owner=launch.get("owner"))
    except ranks.ShareDone:
        return 0
    except BaseException as exc:
        _save_error(folder, rank, exc)
        raise
    assert relay is not None
    torch.save(result, result_path(folder))
    relay.send(channel.DONE, str(result_path(folder)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
