"""Paths and storage URIs: one place that knows a local path from `s3://`, `gs://`, `file://`.

Runs keep small text files (histories, pids) wherever `run.storage_path` points; Serve replicas
need local copies of checkpoints and banks that may live on shared storage.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def is_uri(path: str) -> bool:
    return "://" in str(path)


def absolute(path: str) -> str:
    """A URI as given, a local path made absolute (what Ray wants as a storage path)."""
    return str(path) if is_uri(path) else os.path.abspath(path)


def write_text(uri_or_path: str, text: str) -> None:
    """Write a small file to a local path or a storage URI (s3://, gs://, ...)."""
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri_or_path) if is_uri(uri_or_path) else \
        (pafs.LocalFileSystem(), os.path.abspath(uri_or_path))
    fs.create_dir(os.path.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def localize(uri: str, cache: Path | None = None) -> str:
    """A local path for a path or URI. file:// and plain paths are used in place; other URIs
    (s3://, gs://, ... anything pyarrow.fs reads) are copied once into a per-URI cache."""
    if not is_uri(uri):
        return str(Path(uri).expanduser().resolve())
    if uri.startswith("file://") and cache is None:
        return uri[len("file://"):]
    import pyarrow.fs as pafs

    cache = cache or Path(tempfile.gettempdir()) / "lvm_ray_cache"
    target = cache / hashlib.sha1(uri.encode()).hexdigest()[:16] / Path(uri.rstrip("/")).name
    if target.exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent))
    try:
        src_fs, src = pafs.FileSystem.from_uri(uri)
        out = tmp / target.name
        if src_fs.get_file_info(src).type == pafs.FileType.Directory:
            out.mkdir()
        pafs.copy_files(src, str(out), source_filesystem=src_fs,
                        destination_filesystem=pafs.LocalFileSystem())
        try:
            os.replace(out, target)  # atomic: a replica copying the same URI never sees half
        except OSError:
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
