"""Checkpoints on object storage: each node downloads one once into a local cache, which the tokenizer and the engine
both load.

The cache folder is named by the checkpoint's URL and the size and ETag of each of its files, so a changed checkpoint
is a new folder. One process per node downloads (a file lock), into a `.partial` folder that a later attempt resumes
(files already there at their full size are kept), then renames it into place with a completion marker inside.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from qwen_batch.pipelines import storage
from qwen_batch.schemas.errors import SpecError

log = logging.getLogger(__name__)

MODEL_DIR_ENV = "QWEN_BATCH_MODEL_DIR"
COMPLETE_MARKER = ".qwen-batch-download.json"
COPY_CHUNK_BYTES = 16 << 20


def model_dir() -> Path:
    """Folder holding local checkpoints by Hugging Face id (`<dir>/Qwen/Qwen2.5-7B-Instruct`), and under `remote/`
    the copies of checkpoints on object storage."""
    return Path(os.environ.get(MODEL_DIR_ENV) or Path.home() / ".cache" / "qwen-batch" / "models")


def is_remote(path: str) -> bool:
    """A checkpoint on object storage (s3://, gs://, ...), not a local folder or a Hugging Face id."""
    return "://" in path and not path.startswith("file://")


def checkpoint_files(url: str) -> list[storage.FileInfo]:
    """The files of a checkpoint on object storage; SpecError naming model.path when there is none."""
    try:
        files = storage.list_files(url)
    except SpecError as error:
        raise SpecError(f"model.path {storage.display_url(url)}: no checkpoint there ({error}). Give the folder that "
                        "holds the checkpoint's config.json and weights") from None
    if not any(f.relpath == "config.json" for f in files):
        raise SpecError(f"model.path {storage.display_url(url)}: the folder has no config.json, so it is not a "
                        f"checkpoint (found {', '.join(f.relpath for f in files[:5])}); give the checkpoint's folder")
    return files


def local_checkpoint(path: str) -> str:
    """What to load for `path`: a local copy of a checkpoint on object storage (downloaded on first use on this
    node), else `path` itself."""
    return str(local_copy(path)[0]) if is_remote(path) else path


def local_copy(url: str) -> tuple[Path, bool]:
    """(this node's copy of the checkpoint at `url`, whether this call downloaded it)."""
    return node_copy(url, checkpoint_files(url), model_dir() / "remote")


def node_copy(url: str, files: list[storage.FileInfo], root: Path, prefix: str = "") -> tuple[Path, bool]:
    """(this node's copy of `files` of the folder at `url`, under `root`; whether this call downloaded it).

    The copy's folder is `prefix` and a key of the URL and the files' sizes and ETags, so changed files are a new
    copy. One process per node downloads, holding the key's lock; the others wait and reuse the copy.
    """
    identity = "\n".join([url, *(f"{f.relpath}\0{f.size}\0{f.fingerprint}" for f in files)])
    name = prefix + hashlib.sha256(identity.encode()).hexdigest()[:24]
    folder = root / name
    if (folder / COMPLETE_MARKER).exists():
        return folder, False
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
        if (folder / COMPLETE_MARKER).exists():
            return folder, False  # another process on this node downloaded it meanwhile
        started = time.monotonic()
        partial = root / f".{name}.partial"
        for info in files:
            target = partial / info.relpath
            if target.exists() and target.stat().st_size == info.size:
                continue  # kept from an interrupted attempt
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name(target.name + ".download")
            with open(temporary, "wb") as out:
                storage.read_file(info.url, lambda handle: _copy(handle, out))
            os.replace(temporary, target)
        (partial / COMPLETE_MARKER).write_text(json.dumps({
            "url": storage.display_url(url), "files": {f.relpath: f"{f.size}:{f.fingerprint}" for f in files},
            "pid": os.getpid(), "downloaded_at": time.time()}))
        os.replace(partial, folder)
    log.info("downloaded %s (%d files, %.1f GiB) to %s in %.1f s", storage.display_url(url), len(files),
             sum(f.size for f in files) / 2**30, folder, time.monotonic() - started)
    return folder, True


def _copy(handle, out) -> None:
    """Copy an open object to a local file, starting over on a retry of the read."""
    out.seek(0)
    out.truncate()
    shutil.copyfileobj(handle, out, COPY_CHUNK_BYTES)
