"""Connecting to Ray: an existing cluster when given an address, else a local one sized to this machine."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import ray

log = logging.getLogger(__name__)

LOCAL_OBJECT_STORE_BYTES = 512 << 20


@contextmanager
def ray_cluster(address: str | None = None) -> Iterator[None]:
    """Use the running Ray connection, the cluster at `address` (or RAY_ADDRESS), or start a local one; shut down
    only what this call started."""
    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                 log_to_driver=True)
    log.info("connected to Ray: %s", ray.cluster_resources())
    try:
        yield
    finally:
        ray.shutdown()

