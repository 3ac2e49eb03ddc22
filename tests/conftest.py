"""Shared fixtures: a real S3 server (SeaweedFS) on loopback, private caches, tiny Qwen checkpoints, local Ray."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from s3server import S3Server  # tests/ is on sys.path: pytest puts conftest folders there


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that use the `cluster` fixture of their module start a Ray cluster of their own: mark them so."""
    for item in items:
        if "cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A running SeaweedFS S3 server with one bucket; the AWS_* client variables point at it for the session."""
    with S3Server(tmp_path_factory.mktemp("s3")) as server, pytest.MonkeyPatch.context() as environment:
        for name, value in server.env().items():
            environment.setenv(name, value)
        yield server


@pytest.fixture(scope="session", autouse=True)
def private_caches(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep every cache (vLLM, torch, Hugging Face, Ray, our models) inside the session's temp folder, offline."""
    root = tmp_path_factory.mktemp("caches")
    with pytest.MonkeyPatch.context() as environment:
        for name in ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "XDG_CACHE_HOME", "HF_HOME", "QWEN_BATCH_MODEL_DIR"):
            environment.setenv(name, str(root / name.lower()))
        environment.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="session")
def tiny_models(private_caches: None) -> dict[str, Path]:
    """The two tiny checkpoints, built where the catalog's `tiny-qwen2` / `tiny-qwen3` variants find them."""
    from qwen_batch.jobs.driver import model_dir
    from qwen_batch.jobs.tiny_model import make_tiny_model

    return {arch: make_tiny_model(arch, model_dir() / "qwen-batch" / f"tiny-{arch}") for arch in ("qwen2", "qwen3")}


@pytest.fixture(scope="session")
def ray_local(s3: S3Server, tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A local Ray cluster for the session (started after the S3 variables are set, so workers inherit them)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 << 20,
             _temp_dir=str(tmp_path_factory.mktemp("ray")), log_to_driver=True)
    yield
    ray.shutdown()
