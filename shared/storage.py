"""One store for a run: a local directory or an s3://bucket/prefix, through fsspec.

Everything a stage writes goes through `Store.commit`, which makes a shard's outputs
visible atomically and writes the completion marker last, so a reader that trusts only
marked shards never sees half a shard. Markers and dead-letter records live here too,
so no stage handles them itself.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import fsspec

MARKERS = "_markers"
DEADLETTER = "_deadletter"


class StoreError(RuntimeError):
    """The store cannot be used (unwritable, unreachable, malformed URI)."""


def unreachable_errors() -> tuple[type[BaseException], ...]:
    """What a store out of reach for a while raises (refused, reset, timed out), as opposed to a
    bad request: a task retries it and `run` waits through it, as for the broker."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        import botocore.exceptions as boto
        errors += [boto.ConnectionError, boto.HTTPClientError]  # endpoint refused, reset, read timeout
    except ImportError:
        pass
    try:
        import aiohttp
        errors.append(aiohttp.ClientConnectionError)
    except ImportError:
        pass
    return tuple(errors)


def s3_options_from_env() -> dict:
    """S3 endpoint and credentials come from the environment, never from code."""
    endpoint = os.environ.get("CLIPFLEET_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}


class Store:
    def __init__(self, uri: str, **storage_options):
        self.uri = uri.rstrip("/")
        protocol = fsspec.utils.get_protocol(self.uri)
        if protocol == "s3" and not storage_options:
            storage_options = s3_options_from_env()
        self.fs = fsspec.filesystem(protocol, **storage_options)
        self.local = protocol in ("file", "local")
        self.root = self.fs._strip_protocol(self.uri)

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    # -- paths ---------------------------------------------------------------
    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def url(self, rel: str) -> str:
        """A URI other tools (img2dataset, webdataset, pandas) can open."""
        return f"{self.uri}/{rel}"

    # -- reading -------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def open(self, rel: str, mode: str = "rb"):
        if "w" in mode or "a" in mode:
            raise ValueError("write through Store.commit or Store.write_bytes, which are atomic")
        return self.fs.open(self.path(rel), mode)

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def read_json(self, rel: str):
        return json.loads(self.read_bytes(rel))

    def list(self, rel: str) -> list[str]:
        """File names directly under `rel`, sorted; empty when it does not exist."""
        try:
            entries = self.fs.ls(self.path(rel), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in entries)

    # -- writing -------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        with tempfile.NamedTemporaryFile(delete=False) as tmp:
            tmp.write(data)
        try:
            self._put(tmp.name, rel)
        finally:
            os.unlink(tmp.name)

    def write_json(self, rel: str, obj, strict: bool = False) -> None:
        """`strict`: refuse NaN and infinities, so the file is standard JSON (jq, browsers)."""
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True, default=str, allow_nan=not strict).encode())

    def _put(self, local_file: str, rel: str) -> None:
        """Make one file visible all at once under `rel`.

        An S3 PUT (and a multipart upload) is invisible until complete, so it goes straight
        to its name; on a file system we write a hidden temporary name and rename it.
        """
        target = self.path(rel)
        if self.local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{os.path.dirname(target)}/.{os.path.basename(target)}.{uuid.uuid4().hex}.tmp"
            shutil.copyfile(local_file, tmp)
            os.replace(tmp, target)
        else:
            self.fs.put_file(local_file, target)

    def check_writable(self) -> None:
        """Fail early, with one clear line, when the store cannot take writes."""
        probe = f".probe-{socket.gethostname()}-{uuid.uuid4().hex}"
        try:
            self.write_bytes(probe, b"ok")
            self.fs.rm(self.path(probe))
        except Exception as exc:  # any backend error means the same thing to the user
            raise StoreError(f"store {self.uri} is not writable: {exc.__class__.__name__}: {exc}") from exc

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A local scratch directory for a shard's outputs before commit."""
        with tempfile.TemporaryDirectory(prefix="clipfleet-") as tmp:
            yield Path(tmp)

    def commit(self, stage: str, shard, outputs: dict[str, Path], record: dict) -> dict:
        """Publish a shard: every output file, then its marker, in that order.

        Outputs may be re-published by a redelivered task; they are the same names with
        the same content, and the marker that makes them count is written only at the end.
        """
        for rel, local_file in outputs.items():
            self._put(str(local_file), rel)
        marker = {"stage": stage, "shard": shard, "outputs": sorted(outputs),
                  "finished_at": time.time(), "host": socket.gethostname(), **record}
        self.write_json(marker_path(stage, shard), marker)
        return marker

    # -- markers and dead letters -------------------------------------------
    def marker(self, stage: str, shard) -> dict | None:
        try:
            return self.read_json(marker_path(stage, shard))
        except FileNotFoundError:
            return None

    def done(self, stage: str) -> set[str]:
        """Shard ids (as strings) that have a completion marker for `stage`."""
        return {n[:-5] for n in self.list(f"{MARKERS}/{stage}") if n.endswith(".json")}

    def markers(self, stage: str) -> list[dict]:
        return [self.read_json(f"{MARKERS}/{stage}/{s}.json") for s in sorted(self.done(stage))]

    def write_deadletter(self, stage: str, shard, record: dict) -> None:
        self.write_json(f"{DEADLETTER}/{stage}/{shard_name(shard)}.json",
                        {"stage": stage, "shard": shard, "failed_at": time.time(), **record})

    def deadletters(self, stage: str) -> list[dict]:
        return [self.read_json(f"{DEADLETTER}/{stage}/{n}")
                for n in self.list(f"{DEADLETTER}/{stage}") if n.endswith(".json")]


def shard_name(shard) -> str:
    """Shard ids are ints derived from their input; names are zero-padded to 5 digits."""
    return f"{shard:05d}" if isinstance(shard, int) else str(shard)


def marker_path(stage: str, shard) -> str:
    return f"{MARKERS}/{stage}/{shard_name(shard)}.json"
