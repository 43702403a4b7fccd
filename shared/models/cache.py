"""The model cache: a model's files fetched once for a fleet, kept in object storage, copied to
each machine once.

Layout under the cache URI (default `<store>/models`):

  hub/models--ORG--REPO/refs/main              the commit the files came from
  hub/models--ORG--REPO/snapshots/COMMIT/FILE  the files, as in a Hugging Face cache
  clip/FILE                                    open_clip weights published at a plain URL
  manifests/KEY.json                           what a model needs, with sizes and sha256s;
                                               written last, so a manifest means "complete"

A machine's copy goes where the libraries look anyway (huggingface_hub's cache, HF_HOME /
HF_HUB_CACHE; ~/.cache/clip for plain-URL weights), so open_clip and transformers load it with
no network and no special path. `fetch` (shared/models/fetch.py) fills the cache; workers call
`ensure_local` before loading, which copies under a file lock so concurrent processes on one
machine copy once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger("clipfleet.models")

MODELS_DIR = "models"
MANIFESTS = "manifests"
_synced: set[tuple[str, str]] = set()  # (cache uri, name) already checked by this process


def cache_uri_of(store_uri: str) -> str:
    """The run's model cache: `<store>/models`."""
    return f"{store_uri.rstrip('/')}/{MODELS_DIR}"


def manifest_key(name: str) -> str:
    """A file name for a model name (`ViT-B-32/openai` -> `ViT-B-32--openai`)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "--", name).strip("-") or "model"


def hub_cache_dir() -> Path:
    """This machine's Hugging Face hub cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache)."""
    explicit = os.environ.get("HF_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def clip_cache_dir() -> Path:
    """Where open_clip keeps weights downloaded from plain URLs."""
    return Path(os.path.expanduser("~/.cache/clip"))


def local_root(area: str) -> Path:
    return hub_cache_dir() if area == "hub" else clip_cache_dir()


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _store(uri: str):
    from clipfleet.shared.storage import Store
    return Store(uri)


def read_manifest(cache_uri: str, name: str) -> dict | None:
    """The cache's manifest for `name`, or None when the model is not (completely) there."""
    store = _store(cache_uri)
    rel = f"{MANIFESTS}/{manifest_key(name)}.json"
    return store.read_json(rel) if store.exists(rel) else None


def upload(cache_uri: str, name: str, files: list[dict], extra: dict | None = None) -> dict:
    """Put `files` ({area, path, local}) in the cache and write the manifest last.

    `path` is the file's place under its area (as in a Hugging Face cache); `local` where it
    is on this machine now. A file already in the cache with the same size is not sent again."""
    store = _store(cache_uri)
    entries = []
    for item in files:
        rel = f"{item['area']}/{item['path']}"
        size = os.path.getsize(item["local"])
        if not (store.exists(rel) and store.fs.size(store.path(rel)) == size):
            store._put(str(item["local"]), rel)
        entries.append({"area": item["area"], "path": item["path"], "size": size,
                        "sha256": item.get("sha256") or sha256_of(item["local"])})
    refs = {f"{e['area']}/{_ref_of(e['path'])[0]}": _ref_of(e["path"])[1]
            for e in entries if e["area"] == "hub" and _ref_of(e["path"])}
    for rel, commit in refs.items():
        store.write_bytes(rel, commit.encode())
    manifest = {"name": name, "files": entries, **(extra or {})}
    store.write_json(f"{MANIFESTS}/{manifest_key(name)}.json", manifest)
    return manifest


def _ref_of(path: str) -> tuple[str, str] | None:
    """("models--o--r/refs/main", COMMIT) for "models--o--r/snapshots/COMMIT/file"."""
    parts = path.split("/")
    if len(parts) >= 4 and parts[1] == "snapshots":
        return f"{parts[0]}/refs/main", parts[2]
    return None


def local_files_present(manifest: dict) -> bool:
    return all((local_root(e["area"]) / e["path"]).is_file()
               and (local_root(e["area"]) / e["path"]).stat().st_size == e["size"]
               for e in manifest["files"])


def ensure_local(name: str, cache_uri: str | None) -> bool:
    return sync_model(name, cache_uri) is not None


def sync_model(name: str, cache_uri: str | None) -> int | None:
    """Copy `name`'s files from the model cache to this machine, once.

    Returns how many files this call copied (0: already here), or None when the cache has no
    manifest for the model (shipped and local models never do). Checked once per process; a
    file lock per model makes concurrent processes of a machine copy it once."""
    if not cache_uri:
        return None
    if (cache_uri, name) in _synced:
        return 0
    manifest = read_manifest(cache_uri, name)
    if manifest is None:
        return None
    copied = 0
    if not local_files_present(manifest):
        from filelock import FileLock
        locks = hub_cache_dir() / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with FileLock(str(locks / f"clipfleet-{manifest_key(name)}.lock")):
            if not local_files_present(manifest):  # another process may have copied it meanwhile
                copied = _copy_down(cache_uri, manifest)
    _synced.add((cache_uri, name))
    return copied


def _copy_down(cache_uri: str, manifest: dict) -> int:
    store = _store(cache_uri)
    copied = 0
    for entry in manifest["files"]:
        target = local_root(entry["area"]) / entry["path"]
        if target.is_file() and target.stat().st_size == entry["size"]:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        os.close(fd)
        try:
            with store.open(f"{entry['area']}/{entry['path']}") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
            if sha256_of(tmp) != entry["sha256"]:
                raise OSError(f"{entry['area']}/{entry['path']} in the model cache {cache_uri} does "
                              f"not match its manifest's sha256; fetch the model again")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        copied += 1
        log.info("copied %s/%s from the model cache %s", entry["area"], entry["path"], cache_uri)
    for entry in manifest["files"]:
        ref = _ref_of(entry["path"]) if entry["area"] == "hub" else None
        if ref:
            path = hub_cache_dir() / ref[0]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(ref[1])
    return copied


def copy_to_machine(names: list[str], store_uri: str) -> None:
    """Before a worker loads a run's models: copy each one the run's model cache holds."""
    from clipfleet.shared.models.fetch import needs_fetch
    cache_uri = cache_uri_of(store_uri)
    for name in names:
        if needs_fetch(name):  # shipped and local models have nothing in the cache
            ensure_local(name, cache_uri)
