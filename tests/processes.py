"""Stopping processes a test or a benchmark started: terminate, wait, then kill what is left."""

from __future__ import annotations

from collections.abc import Iterable

import psutil


def stop_processes(processes: Iterable[psutil.Process], timeout_s: float = 5) -> None:
    """Terminate each process, give them `timeout_s` to exit, kill the ones still alive."""
    processes = list(processes)
    for process in processes:
        try:
            process.terminate()
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(alive, timeout=timeout_s)
