"""LAION's released head files, imported as they ship into the state dicts heads.py loads.

  nsfw-l14, nsfw-b32   CLIP-based-NSFW-Detector's autokeras models: a zip of a TensorFlow
                       SavedModel (read with tfbundle, no TensorFlow), its unzipped folder, or
                       a Keras .h5 file (read with h5py)
  aesthetic-l14        improved-aesthetic-predictor's .pth (a PyTorch state dict)
  watermark-effnet     LAION-5B-WatermarkDetection's .pt (a PyTorch state dict)

`import_head(KIND, FILE)` checks every key and shape against the architecture and returns the
state dict; `save_head` writes it where `--punsafe-head KIND:FILE` (and the other head flags)
read it. `download(KIND, cache_uri)` fetches LAION's published file over HTTPS, checks its
sha256 and imports it into `<cache>/heads/KIND.pt`.
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from clipfleet.shared.models.heads import HeadError, build_architecture, check_state_dict

KINDS = ("nsfw-l14", "nsfw-b32", "aesthetic-l14", "watermark-effnet")
# Where LAION publishes each file. sha256: the digest the file must have; None where no digest
# was at hand when this was written: the first fetch records the digest it got in the cache
# (heads/KIND.source.json) and `--sha256` pins one.
LAION_FILES = {
    "nsfw-l14": ("https://raw.githubusercontent.com/LAION-AI/CLIP-based-NSFW-Detector/main/"
                 "clip_autokeras_binary_nsfw.zip", None),
    "nsfw-b32": ("https://raw.githubusercontent.com/LAION-AI/CLIP-based-NSFW-Detector/main/"
                 "clip_autokeras_nsfw_b32.zip", None),
    "aesthetic-l14": ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                      "sac+logos+ava1-l14-linearMSE.pth", None),
    "watermark-effnet": ("https://github.com/LAION-AI/LAION-5B-WatermarkDetection/releases/download/"
                         "1.0/watermark_model_v1.pt", None),
}


def import_head(kind: str, path: str) -> dict:
    """The torch state dict of LAION's released `kind` file at `path`, checked key by key."""
    if kind not in KINDS:
        raise HeadError(f"unknown head kind {kind!r}; one of {', '.join(KINDS)}")
    if not os.path.exists(path):
        raise HeadError(f"head file {path} does not exist")
    module = build_architecture(kind)
    state = _keras_state(kind, module, path) if kind.startswith("nsfw") else _torch_state(path)
    check_state_dict(kind, module, state, path)
    module.load_state_dict(state, strict=True)  # refuses what check_state_dict might have missed
    return module.state_dict()


def save_head(state: dict, out: str) -> str:
    """Write a state dict to a local path or a store URI; the path written."""
    import torch
    buffer = io.BytesIO()
    torch.save(state, buffer)
    if "://" in out:
        from clipfleet.shared.storage import Store
        parent, _, name = out.rstrip("/").rpartition("/")
        Store(parent).write_bytes(name, buffer.getvalue())
        return out
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_bytes(buffer.getvalue())
    return os.path.abspath(out)


# ----------------------------------------------------------------------------- torch files


def _torch_state(path: str) -> dict:
    import torch
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors alike
        raise HeadError(f"{path} is not a PyTorch state dict: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise HeadError(f"{path} holds a {type(state).__name__}, not a state dict")
    # Saved from nn.DataParallel, as training scripts often do.
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


# ----------------------------------------------------------------------------- keras files


def _keras_layers(path: str) -> list[dict[str, np.ndarray]]:
    """Each layer that has weights, in order: {"mean"|"variance"|"kernel"|"bias": array}."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            index = [n for n in names if n.endswith("variables/variables.index")]
            if not index:
                raise HeadError(f"{path} is a zip without a SavedModel (no variables/variables.index)")
            prefix = index[0][:-len("variables.index")]
            shards = sorted(n for n in names if n.startswith(prefix + "variables.data-"))
            return _bundle_layers(zf.read(index[0]), [zf.read(n) for n in shards], path)
    if os.path.isdir(path):
        folder = Path(path) / "variables"
        shards = sorted(folder.glob("variables.data-*"))
        if not (folder / "variables.index").is_file():
            raise HeadError(f"{path} is a folder without a SavedModel (no variables/variables.index)")
        return _bundle_layers((folder / "variables.index").read_bytes(), [s.read_bytes() for s in shards], path)
    return _h5_layers(path)


def _bundle_layers(index: bytes, shards: list[bytes], path: str) -> list[dict[str, np.ndarray]]:
    from clipfleet.shared.models.tfbundle import BundleError, read_variables
    try:
        variables = read_variables(index, shards)
    except BundleError as exc:
        raise HeadError(f"{path}: {exc}") from exc
    layers: dict[int, dict] = {}
    for key, value in variables.items():
        parts = key.split("/")
        # Keras' object graph names a layer with weights "layer_with_weights-N"; N is its order.
        if len(parts) == 4 and parts[0].startswith("layer_with_weights-") and parts[2] == ".ATTRIBUTES":
            layers.setdefault(int(parts[0].rsplit("-", 1)[1]), {})[parts[1]] = value
    return [layers[i] for i in sorted(layers)]


def _h5_layers(path: str) -> list[dict[str, np.ndarray]]:
    import h5py
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise HeadError(f"{path} is neither a zipped SavedModel, a SavedModel folder nor a Keras "
                        f".h5 file: {exc}") from exc
    with handle as f:
        root = f["model_weights"] if "model_weights" in f else f
        layers = []
        for name in (n.decode() if isinstance(n, bytes) else n for n in root.attrs.get("layer_names", [])):
            group = root[name]
            weights = {}
            for wname in (w.decode() if isinstance(w, bytes) else w for w in group.attrs.get("weight_names", [])):
                weights[wname.rsplit("/", 1)[-1].split(":")[0]] = np.asarray(group[wname])
            if weights:
                layers.append(weights)
        return layers


def _keras_state(kind: str, module, path: str) -> dict:
    """autokeras' Normalization then Dense layers, mapped onto LaionNsfw's keys."""
    import torch
    layers = _keras_layers(path)
    if not layers or not {"mean", "variance"} <= set(layers[0]):
        raise HeadError(f"{path}: the first layer with weights is not a Normalization (mean, variance): "
                        f"not one of LAION's autokeras NSFW detectors")
    dense = [layer for layer in layers[1:] if "kernel" in layer]
    linear = [name for name, sub in module.named_modules() if isinstance(sub, torch.nn.Linear)]
    if len(dense) != len(linear):
        raise HeadError(f"{path} has {len(dense)} Dense layers, {kind} has {len(linear)}: "
                        f"is it the {'ViT-B/32' if kind == 'nsfw-l14' else 'ViT-L/14'} detector?")
    state = {"mean": torch.from_numpy(layers[0]["mean"].reshape(-1).astype(np.float32)),
             "variance": torch.from_numpy(layers[0]["variance"].reshape(-1).astype(np.float32))}
    for name, layer in zip(linear, dense):
        state[f"{name}.weight"] = torch.from_numpy(np.ascontiguousarray(layer["kernel"].T, np.float32))
        state[f"{name}.bias"] = torch.from_numpy(layer.get("bias", np.zeros(layer["kernel"].shape[1])).astype(np.float32))
    return state


# ----------------------------------------------------------------------------- download


def cached_spec(kind: str, cache_uri: str) -> str | None:
    """The head spec of an imported LAION `kind` in the model cache, or None if not there."""
    from clipfleet.shared.storage import Store
    rel = f"heads/{kind}.pt"
    return f"{kind}:{cache_uri.rstrip('/')}/{rel}" if Store(cache_uri).exists(rel) else None


def download(kind: str, cache_uri: str, url: str | None = None, sha256: str | None = None) -> str:
    """Fetch LAION's `kind` file over HTTPS (plain HTTP only on loopback), check its sha256,
    import it and write `<cache>/heads/KIND.pt`; the spec to pass to the head flags."""
    import requests

    from clipfleet.shared.storage import Store
    if kind not in KINDS:
        raise HeadError(f"unknown head kind {kind!r}; one of {', '.join(KINDS)}")
    default_url, pinned = LAION_FILES[kind]
    mirror = os.environ.get("CLIPFLEET_LAION_MIRROR")  # a folder holding LAION's files by their names
    if mirror and not url:
        url = f"{mirror.rstrip('/')}/{default_url.rsplit('/', 1)[1]}"
    url, sha256 = url or default_url, (sha256 or pinned or "").lower() or None
    if not (url.startswith("https://") or url.startswith(("http://127.", "http://localhost"))):
        raise HeadError(f"{url}: LAION's files are fetched over HTTPS")
    store = Store(cache_uri)
    source_rel = f"heads/{kind}.source.json"
    if sha256 is None and store.exists(source_rel):
        sha256 = store.read_json(source_rel).get("sha256")  # pinned by the first fetch
    suffix = os.path.splitext(url.rsplit("/", 1)[-1])[1] or ".bin"
    with tempfile.TemporaryDirectory(prefix="clipfleet-head-") as tmp:
        local = os.path.join(tmp, f"{kind}{suffix}")
        digest = hashlib.sha256()
        try:
            with requests.get(url, stream=True, timeout=60) as response:  # proxies from the environment
                response.raise_for_status()
                with open(local, "wb") as fh:
                    for chunk in response.iter_content(1 << 20):
                        digest.update(chunk)
                        fh.write(chunk)
        except requests.RequestException as exc:
            raise HeadError(f"{kind}: {url} cannot be fetched: {exc}") from exc
        got = digest.hexdigest()
        if sha256 and got != sha256:
            raise HeadError(f"{kind}: {url} has sha256 {got}, expected {sha256}; refusing it")
        state = import_head(kind, local)
        target = save_head(state, f"{cache_uri.rstrip('/')}/heads/{kind}.pt")
        store.write_json(source_rel, {"url": url, "sha256": got, "pinned": bool(sha256)})
    return f"{kind}:{target}"
