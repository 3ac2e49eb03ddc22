from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import pytest
from s3server import S3Server

from qwen_batch.pipelines import storage
from qwen_batch.pipelines.storage import FileInfo, RetryPolicy
from qwen_batch.schemas.errors import SpecError

NO_BOTOCORE_RETRIES = {"config_kwargs": {"retries": {"total_max_attempts": 1}}}


@pytest.fixture
def s3_root(s3: S3Server) -> str:
    """A fresh prefix in the test bucket."""
    return f"s3://{s3.bucket}/{uuid.uuid4().hex}"


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage, "RETRY_POLICY", RetryPolicy(attempts=2, first_delay_s=0.01, max_delay_s=0.01))


def make_input_tree(root: str) -> None:
    for name, data in {
        "a.jsonl": b"aaa",
        "sub/b.jsonl": b"bbbbb",
        "sub/c.txt": b"c",
        "_tmp/x.jsonl": b"hidden",
        "sub/_SUCCESS": b"",
        ".cache/y.jsonl": b"hidden",
        "sub/.z.jsonl": b"hidden",
    }.items():
        storage.write_bytes(f"{root}/{name}", data)


def create_concurrently(url: str, writers: int = 8) -> list[bool]:
    start = threading.Barrier(writers)

    def create(index: int) -> bool:
        start.wait()
        return storage.create_only(url, f"writer {index}".encode())

    with ThreadPoolExecutor(writers) as pool:
        return list(pool.map(create, range(writers)))


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_filesystem_makes_relative_local_paths_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    fs, path = storage.filesystem("data/in.jsonl")
    assert path == f"{tmp_path}/data/in.jsonl"
    assert storage.filesystem(f"file://{tmp_path}/data")[0] is fs


def test_filesystem_unknown_protocol_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="cannot open nosuchproto://b/x"):
        storage.filesystem("nosuchproto://b/x")


def test_list_files_local_folder_recurses_and_skips_hidden_names(tmp_path: Path) -> None:
    make_input_tree(str(tmp_path))
    assert storage.list_files(str(tmp_path)) == [
        FileInfo(url=f"{tmp_path}/a.jsonl", size=3, relpath="a.jsonl"),
        FileInfo(url=f"{tmp_path}/sub/b.jsonl", size=5, relpath="sub/b.jsonl"),
        FileInfo(url=f"{tmp_path}/sub/c.txt", size=1, relpath="sub/c.txt"),
    ]


def test_list_files_local_glob_relpaths_start_under_static_prefix(tmp_path: Path) -> None:
    make_input_tree(str(tmp_path))
    found = storage.list_files(f"file://{tmp_path}/**/*.jsonl")
    assert [(file.url, file.relpath) for file in found] == [
        (f"{tmp_path}/a.jsonl", "a.jsonl"),
        (f"{tmp_path}/sub/b.jsonl", "sub/b.jsonl"),
    ]


def test_list_files_single_local_file_has_basename_relpath(tmp_path: Path) -> None:
    make_input_tree(str(tmp_path))
    assert storage.list_files(f"{tmp_path}/sub/b.jsonl") == [
        FileInfo(url=f"{tmp_path}/sub/b.jsonl", size=5, relpath="b.jsonl")
    ]


def test_list_files_missing_or_empty_local_input_names_the_url(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=f"no input files at {tmp_path}/nope: the path does not exist"):
        storage.list_files(f"{tmp_path}/nope")
    storage.write_bytes(f"{tmp_path}/only/_hidden", b"x")
    with pytest.raises(SpecError, match=f"no input files at {tmp_path}/only: the folder is empty"):
        storage.list_files(f"{tmp_path}/only")
    with pytest.raises(SpecError, match=f"no input files match {tmp_path}/\\*.parquet"):
        storage.list_files(f"{tmp_path}/*.parquet")


def test_read_bytes_reads_ranges_of_local_files(tmp_path: Path) -> None:
    storage.write_bytes(f"{tmp_path}/f.bin", b"0123456789")
    assert storage.read_bytes(f"{tmp_path}/f.bin") == b"0123456789"
    assert storage.read_bytes(f"{tmp_path}/f.bin", start=2, end=5) == b"234"
    assert storage.read_bytes(f"{tmp_path}/f.bin", start=-3) == b"789"
    assert storage.read_bytes(f"{tmp_path}/f.bin", start=0, end=0) == b""
    assert storage.read_bytes(f"{tmp_path}/f.bin", None, 4, 4) == b""


def test_write_bytes_creates_local_parents_and_overwrites(tmp_path: Path) -> None:
    url = f"{tmp_path}/deep/er/f.txt"
    storage.write_bytes(url, b"first")
    storage.write_bytes(url, b"second")
    assert Path(url).read_bytes() == b"second"


def test_exists_list_names_and_delete_files_on_local_folders(tmp_path: Path) -> None:
    storage.write_bytes(f"{tmp_path}/out/a", b"1")
    storage.write_bytes(f"{tmp_path}/out/sub/_b", b"2")
    storage.write_bytes(f"{tmp_path}/out2/c", b"sibling")
    assert storage.exists(f"{tmp_path}/out/a") and not storage.exists(f"{tmp_path}/out/zzz")
    names = storage.list_names(f"{tmp_path}/out")
    assert names == [f"{tmp_path}/out/a", f"{tmp_path}/out/sub/_b"]
    assert storage.list_names(f"{tmp_path}/absent") == []
    storage.delete_files(f"{tmp_path}/out", names)
    storage.delete_files(f"{tmp_path}/out", names)  # already gone is fine
    assert storage.list_names(f"{tmp_path}/out") == []
    assert storage.list_names(f"{tmp_path}/out2") == [f"{tmp_path}/out2/c"]


@pytest.mark.parametrize("outside", ["<root>/out2/c", "<root>/out", "<root>/c", "<root>/out/../c"])
def test_delete_files_refuses_anything_outside_the_folder(tmp_path: Path, outside: str) -> None:
    storage.write_bytes(f"{tmp_path}/out/a", b"1")
    storage.write_bytes(f"{tmp_path}/out2/c", b"2")
    storage.write_bytes(f"{tmp_path}/c", b"3")

    with pytest.raises(ValueError, match=f"refusing to delete 1 file\\(s\\) outside {tmp_path}/out"):
        storage.delete_files(f"{tmp_path}/out", [f"{tmp_path}/out/a", outside.replace("<root>", str(tmp_path))])

    assert len(storage.list_names(str(tmp_path))) == 3  # nothing deleted, not even the file inside


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
@pytest.mark.parametrize("write", ["write_bytes", "create_only"])
def test_local_files_get_the_mode_the_umask_gives(tmp_path: Path, umask: int, write: str) -> None:
    previous = os.umask(umask)
    try:
        getattr(storage, write)(f"{tmp_path}/out/f.json", b"{}")
    finally:
        os.umask(previous)
    assert (tmp_path / "out" / "f.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert os.listdir(tmp_path / "out") == ["f.json"]


@pytest.mark.parametrize(
    ("first", "second", "inside"),
    [
        ("<root>/data", "<root>/data/", True),
        ("<root>/data", "file://<root>/data", True),
        ("<root>/data", "<root>//data/./out", True),
        ("<root>/data", "<root>/data/out/../in", True),
        ("<root>/data", "<root>/database", False),
        ("<root>/data/*.jsonl", "<root>/data/out", True),
        ("<root>/data/x.jsonl", "<root>/data/out", False),
        ("s3://b/data", "s3://b/data//out/", True),
        ("s3://b/data", "s3a://b/data/out", True),
        ("s3://b/data", "s3://b/database", False),
        ("s3://b/data", "s3://c/data", False),
        ("s3://b/data", "gs://b/data", False),
    ],
)
def test_location_compares_normalised_urls(tmp_path: Path, first: str, second: str, inside: bool) -> None:
    outer, inner = (storage.location(url.replace("<root>", str(tmp_path))) for url in (first, second))
    assert outer.contains(inner) is inside


def test_location_of_a_relative_path_is_the_absolute_one_and_follows_symlinks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path)
    assert storage.location("real/out") == storage.location(f"{tmp_path}/link/out/")


@pytest.mark.parametrize("url", ["/", "file:///", "/tmp/..", "s3://bucket", "s3://bucket/", "gs://bucket//"])
def test_location_roots(url: str) -> None:
    assert storage.location(url).is_root


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:pa55@host.example/data/a.jsonl", "https://host.example/data/a.jsonl"),
        ("https://b.s3.amazonaws.com/a.jsonl?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA%2F&X-Amz-Signature=f00d",
         "https://b.s3.amazonaws.com/a.jsonl"),
        ("https://acct.blob.core.windows.net/c/a.csv?sv=2024&sig=abc%3D", "https://acct.blob.core.windows.net/c/a.csv"),
        ("s3://b/k.parquet?versionId=7", "s3://b/k.parquet?versionId=7"),
        ("/data/what?.jsonl", "/data/what?.jsonl"),
    ],
)
def test_display_url_drops_credentials_and_signatures(url: str, shown: str) -> None:
    assert storage.display_url(url) == shown


@pytest.mark.parametrize(
    "secret",
    [
        "postgresql://app:hunter2-9f@db.internal:5432/x", "Authorization: Bearer abcdefghijklmnop",
        "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=c2VjcmV0LWtleQ==;EndpointSuffix=core.windows.net",
        "hf_AbCdEfGhIjKlMnOpQrStUv12", "sk-proj-abcdefghijklmnopqrstuvwx", "ghp_abcdefghijklmnopqrstuvwxyz0123",
        "AKIAABCDEFGHIJKLMNOP", "https://h/x?X-Amz-Security-Token=tok123&a=1",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.c2lnbmF0dXJlLXZhbHVl",
    ],
)
def test_redact_masks_secrets_recognised_by_value(secret: str) -> None:
    hidden = {"postgresql://app:hunter2-9f@": "hunter2-9f", "Authorization": "abcdefghijklmnop",
              "Default": "c2VjcmV0LWtleQ==", "https://h/x": "tok123"}
    value = next((v for k, v in hidden.items() if secret.startswith(k)), secret)
    redacted = storage.redact({"engine": {"env": {"SOME_SETTING": f"x {secret} y"}}, "list": [secret]})
    assert value not in str(redacted)
    assert "***" in redacted["engine"]["env"]["SOME_SETTING"] and redacted["list"][0] != secret


def test_redact_keeps_ordinary_values() -> None:
    spec = {"path": "s3://b/in/*.jsonl", "template": "Q: {text}", "max_tokens": 5, "stop": ["token=", "\n"],
            "url": "https://host/a.jsonl?page=2"}
    assert storage.redact(spec) == spec


def test_read_file_raises_the_storage_error_a_reader_turned_into_its_own(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"x" * 100)

    def reader(handle) -> None:
        handle._handle.close()  # the store goes away mid-read
        try:
            handle.read(1)
        except ValueError as exc:
            raise OSError("Corrupt snappy compressed data") from exc  # what pyarrow may make of a lost connection

    with pytest.raises(ValueError, match="closed file"):
        storage.read_file(str(tmp_path / "a.bin"), reader)


def test_create_only_local_creates_once_and_leaves_no_temp_files(tmp_path: Path) -> None:
    url = f"{tmp_path}/markers/_COMMITTED"
    assert storage.create_only(url, b"first") is True
    assert storage.create_only(url, b"second") is False
    assert Path(url).read_bytes() == b"first"
    assert os.listdir(tmp_path / "markers") == ["_COMMITTED"]


def test_create_only_local_has_exactly_one_winner_among_concurrent_writers(tmp_path: Path) -> None:
    results = create_concurrently(f"{tmp_path}/_COMMITTED")
    assert results.count(True) == 1
    assert (tmp_path / "_COMMITTED").read_bytes() == f"writer {results.index(True)}".encode()


def test_transient_errors_are_retried_and_logged(fast_retries: None, caplog: pytest.LogCaptureFixture) -> None:
    failures = [ConnectionResetError("reset by peer")]

    @storage._retried
    def flaky(url: str) -> str:
        if failures:
            raise failures.pop()
        return "ok"

    assert flaky("s3://b/k") == "ok"
    assert "flaky(s3://b/k) failed with ConnectionResetError (attempt 1 of 2)" in caplog.text


def test_permanent_errors_are_not_retried(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{tmp_path}/missing")
    assert "retrying" not in caplog.text


def test_redact_hides_secret_values_at_any_depth() -> None:
    spec = {
        "input": {"path": "s3://b/in", "storage_options": {"key": "AKIA", "secret": "s", "client_kwargs": {"a": 1}}},
        "env": [{"AWS_SESSION_TOKEN": "t", "password": "p", "Credentials": {"x": 1}}],
        "sampling": {"max_tokens": 64, "tokenizer": "qwen"},
    }
    assert storage.redact(spec) == {
        "input": {"path": "s3://b/in", "storage_options": {"key": "***", "secret": "***", "client_kwargs": {"a": 1}}},
        "env": [{"AWS_SESSION_TOKEN": "***", "password": "***", "Credentials": "***"}],
        "sampling": {"max_tokens": 64, "tokenizer": "qwen"},
    }
    assert spec["input"]["storage_options"]["secret"] == "s"


@pytest.mark.s3
def test_list_files_on_s3_folder_glob_and_single_file(s3: S3Server, s3_root: str) -> None:
    make_input_tree(s3_root)
    prefix = s3_root.removeprefix(f"s3://{s3.bucket}/")
    boto3.client("s3").put_object(Bucket=s3.bucket, Key=f"{prefix}/sub/marker/", Body=b"")
    assert storage.list_files(s3_root) == [
        FileInfo(url=f"{s3_root}/a.jsonl", size=3, relpath="a.jsonl"),
        FileInfo(url=f"{s3_root}/sub/b.jsonl", size=5, relpath="sub/b.jsonl"),
        FileInfo(url=f"{s3_root}/sub/c.txt", size=1, relpath="sub/c.txt"),
    ]
    assert [file.relpath for file in storage.list_files(f"{s3_root}/**/*.jsonl")] == ["a.jsonl", "sub/b.jsonl"]
    assert [file.relpath for file in storage.list_files(f"{s3_root}/sub/*")] == ["b.jsonl", "c.txt"]
    assert storage.list_files(f"{s3_root}/sub/b.jsonl") == [
        FileInfo(url=f"{s3_root}/sub/b.jsonl", size=5, relpath="b.jsonl")
    ]


@pytest.mark.s3
def test_list_files_missing_s3_prefix_names_the_url(s3_root: str) -> None:
    with pytest.raises(SpecError, match=f"no input files at {s3_root}/in: the path does not exist; check input.path"):
        storage.list_files(f"{s3_root}/in")


@pytest.mark.s3
def test_missing_bucket_is_a_spec_error(s3: S3Server) -> None:
    with pytest.raises(SpecError, match="bucket 'no-such-bucket-qb' of s3://no-such-bucket-qb/in does not exist"):
        storage.list_files("s3://no-such-bucket-qb/in")


@pytest.mark.s3
def test_read_bytes_reads_ranges_of_s3_objects(s3_root: str) -> None:
    storage.write_bytes(f"{s3_root}/f.bin", b"0123456789")
    assert storage.read_bytes(f"{s3_root}/f.bin", start=2, end=5) == b"234"
    assert storage.read_bytes(f"{s3_root}/f.bin", start=-3) == b"789"
    assert storage.read_bytes(f"{s3_root}/f.bin", start=0, end=0) == b""
    assert storage.read_bytes(f"{s3_root}/f.bin", None, 4, 4) == b""
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{s3_root}/missing")


@pytest.mark.s3
def test_exists_list_names_and_delete_files_on_s3(s3_root: str) -> None:
    storage.write_bytes(f"{s3_root}/out/a", b"1")
    storage.write_bytes(f"{s3_root}/out/sub/_b", b"2")
    storage.write_bytes(f"{s3_root}/out2/c", b"sibling")
    storage.write_bytes(f"{s3_root}/outx", b"sibling object")
    assert storage.exists(f"{s3_root}/out/a") and not storage.exists(f"{s3_root}/out/zzz")
    names = storage.list_names(f"{s3_root}/out")
    assert names == [f"{s3_root}/out/a", f"{s3_root}/out/sub/_b"]
    assert storage.list_names(f"{s3_root}/absent") == []
    storage.delete_files(f"{s3_root}/out", names)
    storage.delete_files(f"{s3_root}/out", names)
    assert storage.list_names(f"{s3_root}/out") == []  # SeaweedFS still lists the emptied prefix as a folder
    assert storage.list_names(s3_root) == [f"{s3_root}/out2/c", f"{s3_root}/outx"]


@pytest.mark.s3
def test_list_files_fingerprints_change_with_the_content(s3_root: str, tmp_path: Path) -> None:
    for root in (s3_root, str(tmp_path)):
        storage.write_bytes(f"{root}/in/a.jsonl", b"abc")
        [before] = storage.list_files(f"{root}/in")
        os.utime(tmp_path / "in" / "a.jsonl", ns=(1, 1)) if root == str(tmp_path) else None
        storage.write_bytes(f"{root}/in/a.jsonl", b"xyz")
        [after] = storage.list_files(f"{root}/in")
        assert before.size == after.size and before.fingerprint and before.fingerprint != after.fingerprint, root


@pytest.mark.s3
def test_create_only_s3_creates_once(s3_root: str) -> None:
    url = f"{s3_root}/_COMMITTED"
    assert storage.create_only(url, b"first") is True
    assert storage.create_only(url, b"second") is False
    assert storage.read_bytes(url) == b"first"


@pytest.mark.s3
def test_create_only_s3_has_exactly_one_winner_among_concurrent_writers(s3_root: str) -> None:
    results = create_concurrently(f"{s3_root}/_COMMITTED")
    assert results.count(True) == 1
    assert storage.read_bytes(f"{s3_root}/_COMMITTED") == f"writer {results.index(True)}".encode()


@pytest.mark.s3
@pytest.mark.parametrize("access_key", ["qb-test-key", "no-such-key"])
def test_rejected_credentials_are_a_spec_error_without_the_secret(
    s3: S3Server, s3_root: str, access_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    storage.write_bytes(f"{s3_root}/in/a.jsonl", b"a")
    wrong = {"key": access_key, "secret": "wrong-secret-0b7e"}
    for call in (lambda: storage.list_files(f"{s3_root}/in", wrong), lambda: storage.list_names(s3_root, wrong)):
        with pytest.raises(SpecError, match="the credentials were rejected; check AWS_ACCESS_KEY_ID") as raised:
            call()
        assert s3_root in str(raised.value)
        assert "wrong-secret-0b7e" not in str(raised.value) and s3.secret_key not in str(raised.value)
    assert "wrong-secret-0b7e" not in caplog.text and s3.secret_key not in caplog.text


@pytest.mark.s3
def test_partial_credentials_are_a_spec_error(s3: S3Server, s3_root: str) -> None:
    with pytest.raises(SpecError, match=f"no usable credentials for {s3_root}/in .*missing: aws_access_key_id"):
        storage.list_files(f"{s3_root}/in", {"secret": "wrong-secret-0b7e"})


@pytest.mark.s3
def test_unreachable_endpoint_is_a_spec_error_naming_it(s3: S3Server, fast_retries: None) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(SpecError, match=f"cannot reach the storage endpoint {endpoint} for s3://b/in"):
        storage.list_files("s3://b/in", {"endpoint_url": endpoint, **NO_BOTOCORE_RETRIES})


@pytest.mark.s3
def test_write_bytes_survives_an_s3_restart(s3: S3Server, s3_root: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=storage.__name__)
    storage.write_bytes(f"{s3_root}/before", b"0", NO_BOTOCORE_RETRIES)
    old_pid = s3.pid
    restart = threading.Thread(target=s3.restart)
    restart.start()
    written = 0
    while restart.is_alive() or written < 3:
        storage.write_bytes(f"{s3_root}/part-{written:04d}", b"x" * written, NO_BOTOCORE_RETRIES)
        written += 1
    restart.join()
    assert s3.pid != old_pid
    assert "write_bytes(s3://" in caplog.text and "retrying" in caplog.text
    assert s3.secret_key not in caplog.text
    assert len(storage.list_names(s3_root)) == written + 1
    assert storage.read_bytes(f"{s3_root}/part-{written - 1:04d}") == b"x" * (written - 1)
