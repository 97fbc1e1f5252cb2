"""Stands in for nnU-Net's preprocessing in smit_plan's Ctrl-C test: a pool of spawned workers that sleep."""
from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path
from typing import List


def workers_that_sleep(dataset_id: int, plans_name: str, configurations: List[str], num_processes: int) -> None:
    """Start ``num_processes`` spawned pool workers (as nnU-Net's preprocessing does), write their pids and this
    process' to the file named by ``$PLAN_TEST_PIDS``, and keep them busy for a minute."""
    with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
        pids = [child.pid for child in multiprocessing.active_children()] + [os.getpid()]
        Path(os.environ["PLAN_TEST_PIDS"]).write_text(" ".join(map(str, pids)))
        pool.map(time.sleep, [60] * num_processes)
