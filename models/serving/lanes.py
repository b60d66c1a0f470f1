"""How a server splits its cores between forwards: *lanes* that run at once, each on its
share of the cores, and one *wide* forward on every core for a request that comes alone.

On a CPU, a forward on fewer cores wastes less of them (less waiting at each operator's
parallel join), and several narrow forwards side by side keep going when the API's own work
takes a core from one of them: a wide forward waits for its slowest thread. Measured on 2
cores, lite0 at 224 px in process: two one-core lanes ran ONNX Runtime at 184 images/s
against 113 to 133 for one two-core forward, eager torch at 117 against 58 to 66 (batch 4).
A single image takes longer on one core (ONNX Runtime 10.3 against 7.1 ms), so a request
that finds every lane idle and nobody waiting gets the wide forward instead.

A GPU runs one forward at a time: one lane, which is the wide one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

MAX_LANES = 4  # beyond this, each lane's share of a large host is needlessly thin


@dataclass(frozen=True)
class LaneLayout:
    lanes: int  # forwards that run at once
    threads: int  # cores (intra-op threads) of each lane's forward
    wide_threads: int  # cores of a lone forward: all of them

    @property
    def widths(self) -> tuple[int, ...]:
        """The thread counts a forward may run with: the wide one first."""
        return (self.wide_threads,) if self.lanes == 1 else (self.wide_threads, self.threads)

    def describe(self) -> dict:
        return {"lanes": self.lanes, "threads": self.threads}


def host_cores() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def lane_layout(device: str, lanes: int = 0, cores: int | None = None) -> LaneLayout:
    """``lanes``: how many (0: one per core, at most MAX_LANES); always one on a GPU."""
    cores = cores or host_cores()
    if device.startswith("cuda"):
        return LaneLayout(1, cores, cores)
    count = max(1, min(lanes or min(cores, MAX_LANES), cores))
    return LaneLayout(count, max(1, cores // count), cores)
