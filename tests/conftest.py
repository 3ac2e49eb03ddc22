"""Shared fixtures: a real S3 server (SeaweedFS) on loopback for tests marked `s3`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from s3server import S3Server  # tests/ is on sys.path: pytest puts conftest folders there


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A running SeaweedFS S3 server with one bucket; the AWS_* client variables point at it for the session."""
    with S3Server(tmp_path_factory.mktemp("s3")) as server, pytest.MonkeyPatch.context() as environment:
        for name, value in server.env().items():
            environment.setenv(name, value)
        yield server
