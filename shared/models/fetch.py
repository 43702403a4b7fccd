"""Fetch a model once, through the libraries' own download paths, into the model cache.

`fetch(name, cache_uri)` downloads what model `name` needs with huggingface_hub's
`hf_hub_download` / `snapshot_download` (the files open_clip would ask for: HF_ENDPOINT,
HF_TOKEN, proxies, resumed downloads and the usual Hugging Face cache all apply) or open_clip's
plain-URL download (its sha256 check included), then puts the files and a manifest in the
model cache (shared/models/cache.py). Offline (HF_HUB_OFFLINE=1 or `offline=True`), only what
this machine's caches already hold is used, and a missing file raises ModelNotAvailable.

Names that need no fetch (`shapes`, a local folder, `ARCH/CHECKPOINT_FILE`) return None.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from clipfleet.shared.models import CONFIG_FILE, ModelNotAvailable, model_folder
from clipfleet.shared.models.cache import (clip_cache_dir, hub_cache_dir, read_manifest, upload)

log = logging.getLogger("clipfleet.models")

# What a Hugging Face text tower (XLM-R, ...) needs besides open_clip's weights: its config and
# tokenizer, not its pretrained weights (open_clip's checkpoint holds the tower's weights).
TOWER_PATTERNS = ["*.json", "*.model", "*.txt", "*.tiktoken"]


def is_offline(offline: bool | None = None) -> bool:
    if offline is not None:
        return offline
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def needs_fetch(name: str) -> bool:
    """Whether `name` is fetched (an open_clip tag or hf-hub repo) rather than local."""
    if model_folder(name) is not None:
        return False
    if name.startswith("hf-hub:"):
        return True
    if "/" in name:
        return not os.path.isfile(name.split("/", 1)[1])
    return False


def local_problem(name: str) -> str | None:
    """Why a model that needs no fetch cannot be loaded here (a missing checkpoint), or None."""
    if needs_fetch(name):
        return None
    if model_folder(name) is not None or ("/" in name and os.path.isfile(name.split("/", 1)[1])):
        return None
    return f"model {name!r} is neither shipped, a local folder, a checkpoint file, nor a fetchable name"


def fetch_command(name: str, cache_uri: str) -> str:
    return f"clipfleet models fetch {name} --to {cache_uri}"


def fetch(name: str, cache_uri: str, offline: bool | None = None, force: bool = False) -> dict | None:
    """Fetch `name` into the model cache (a no-op when its manifest is there); its manifest."""
    if not needs_fetch(name):
        problem = local_problem(name)
        if problem:
            raise ModelNotAvailable(problem)
        return None
    if not force:
        manifest = read_manifest(cache_uri, name)
        if manifest is not None:
            return manifest
    offline = is_offline(offline)
    files = _hub_repo_files(name, offline) if name.startswith("hf-hub:") else _arch_files(name, offline)
    manifest = upload(cache_uri, name, files, {"offline_fetch": offline})
    log.info("fetched %s into the model cache %s (%d files)", name, cache_uri, len(files))
    return manifest


def local_files(name: str) -> list[dict]:
    """The files of `name` this machine's caches hold, asking no hub; ModelNotAvailable if any lacks."""
    return _hub_repo_files(name, True) if name.startswith("hf-hub:") else _arch_files(name, True)


# ----------------------------------------------------------------------------- hub files


def _hub_file(repo: str, filename: str, offline: bool) -> dict:
    """One file through hf_hub_download, as a cache entry ({area, path, local})."""
    from huggingface_hub import hf_hub_download
    local = hf_hub_download(repo, filename, cache_dir=str(hub_cache_dir()), local_files_only=offline,
                            library_name="open_clip", endpoint=_endpoint())
    return _entry(local)


def _endpoint() -> str | None:
    """HF_ENDPOINT as it is now (huggingface_hub reads it once, when first imported)."""
    return os.environ.get("HF_ENDPOINT") or None


def _entry(local: str) -> dict:
    """A file of the hub cache, named by its place in it (models--o--r/snapshots/C/file)."""
    path = Path(local)
    root = hub_cache_dir().resolve()
    rel = path.relative_to(root) if path.is_relative_to(root) else _rel_from_parts(path)
    return {"area": "hub", "path": rel.as_posix(), "local": str(path)}


def _rel_from_parts(path: Path) -> Path:
    parts = path.parts
    for i, part in enumerate(parts):
        if part.startswith("models--") and i + 2 < len(parts) and parts[i + 1] == "snapshots":
            return Path(*parts[i:])
    raise ModelNotAvailable(f"{path} is not inside a Hugging Face cache")


def _first_of(repo: str, filenames: list[str], offline: bool, name: str) -> dict:
    """The first of `filenames` the repo has (safetensors before .bin, as open_clip asks)."""
    errors = []
    for filename in filenames:
        try:
            return _hub_file(repo, filename, offline)
        except Exception as exc:  # not there: the hub library raises several kinds
            errors.append(f"{filename}: {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    raise ModelNotAvailable(_why(name, repo, offline, errors))


def _why(name: str, repo: str, offline: bool, errors: list[str]) -> str:
    where = "this machine's Hugging Face cache (offline)" if offline else \
        f"the hub at {os.environ.get('HF_ENDPOINT') or 'https://huggingface.co'}"
    return f"model {name!r}: {repo} has none of its weight files in {where} ({'; '.join(errors)})"


def _tower_files(text_cfg: dict, offline: bool, name: str) -> list[dict]:
    """Config and tokenizer of a Hugging Face text tower, when the architecture has one."""
    repos = dict.fromkeys(r for r in (text_cfg.get("hf_model_name"), text_cfg.get("hf_tokenizer_name")) if r)
    files = []
    for repo in repos:
        from huggingface_hub import snapshot_download
        try:
            folder = snapshot_download(repo, allow_patterns=TOWER_PATTERNS, cache_dir=str(hub_cache_dir()),
                                       local_files_only=offline, endpoint=_endpoint())
        except Exception as exc:  # unreachable, not cached offline, or no such repo
            raise ModelNotAvailable(f"model {name!r}: its text tower {repo} cannot be fetched: "
                                    f"{exc.__class__.__name__}: {exc}") from exc
        files += [_entry(str(p)) for p in sorted(Path(folder).rglob("*")) if p.is_file()]
    return files


def _weight_names(filename: str) -> list[str]:
    from open_clip.pretrained import HF_WEIGHTS_NAME, _get_safe_alternatives
    filename = filename or HF_WEIGHTS_NAME
    return [*_get_safe_alternatives(filename), filename]


def _arch_files(name: str, offline: bool) -> list[dict]:
    import open_clip
    from open_clip.pretrained import download_pretrained_from_url, get_pretrained_cfg

    arch, tag = name.split("/", 1)
    if arch not in open_clip.list_models():
        raise ModelNotAvailable(f"open_clip has no architecture {arch!r} (model {name!r})")
    cfg = get_pretrained_cfg(arch, tag)
    if not cfg:
        raise ModelNotAvailable(
            f"{tag!r} is neither a checkpoint file nor an open_clip pretrained tag of {arch!r} "
            f"(tags: {', '.join(open_clip.list_pretrained_tags_by_model(arch))})")
    text_cfg = (open_clip.get_model_config(arch) or {}).get("text_cfg", {})
    hub = cfg.get("hf_hub", "")
    if hub:
        repo, filename = os.path.split(hub)  # "org/repo/" names the default file, as in open_clip
        return [_first_of(repo, _weight_names(filename), offline, name), *_tower_files(text_cfg, offline, name)]
    url = cfg.get("url", "")
    if not url:
        raise ModelNotAvailable(f"open_clip names no download for {name!r}")
    target = clip_cache_dir() / os.path.basename(url)
    if not target.is_file():
        if offline:
            raise ModelNotAvailable(f"model {name!r}: {target} is not on this machine and this run is offline")
        target = Path(download_pretrained_from_url(url, cache_dir=str(clip_cache_dir())))
    return [{"area": "clip", "path": target.name, "local": str(target)}, *_tower_files(text_cfg, offline, name)]


def _hub_repo_files(name: str, offline: bool) -> list[dict]:
    repo = name[len("hf-hub:"):]
    try:
        config = _hub_file(repo, CONFIG_FILE, offline)
    except Exception as exc:  # no repo, no config, unreachable, or not cached offline
        raise ModelNotAvailable(_why(name, repo, offline, [f"{CONFIG_FILE}: {exc.__class__.__name__}: "
                                                           f"{str(exc).splitlines()[0] if str(exc) else ''}"]))
    text_cfg = json.loads(Path(config["local"]).read_text()).get("model_cfg", {}).get("text_cfg", {})
    weights = _first_of(repo, _weight_names(""), offline, name)
    return [config, weights, *_tower_files(text_cfg, offline, name)]
