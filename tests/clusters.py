"""Multi-node Ray clusters on this machine for the tests (ray.cluster_utils.Cluster: real raylets)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def local_cluster(prefix: str, head: dict[str, Any], workers: Sequence[dict[str, Any]]) -> Iterator[Any]:
    """A head node with these arguments and one worker node per entry of `workers`, all registered; shut down and
    removed at the end.

    Its session folder is a short one of its own under /tmp whatever TMPDIR says (Ray's Unix socket paths may not
    pass 107 bytes), and so is the address file Cluster writes for `ray.init("auto")`, which would otherwise land in
    `$TMPDIR/ray` (or /tmp/ray) for every Ray user of the machine, and fail where that folder does not exist.
    """
    from ray.cluster_utils import Cluster

    temp_dir = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    (Path(temp_dir) / "ray").mkdir()
    shown = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp_dir  # where Cluster writes, and at shutdown removes, its address file
    try:
        cluster = Cluster(initialize_head=True, head_node_args={**head, "temp_dir": temp_dir})
        try:
            for worker in workers:
                cluster.add_node(**worker)
            cluster.wait_for_nodes()
            yield cluster
        finally:
            cluster.shutdown()
    finally:
        if shown is None:
            os.environ.pop("RAY_TMPDIR")
        else:
            os.environ["RAY_TMPDIR"] = shown
        shutil.rmtree(temp_dir, ignore_errors=True)
