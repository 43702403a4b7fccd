"""Load CLIP models and tag heads from this machine's files only; a worker downloads nothing.

Models are fetched once for a fleet with `clipfleet models fetch` (or by `run`'s preflight)
into the model cache in object storage; a worker copies them from there into this machine's
Hugging Face cache (shared/models/cache.py) and this module loads them from it.

Model names:
  shapes                   the project's small CLIP, shipped in shared/models/shapes/
  ARCH/TAG                 an open_clip architecture and pretrained tag (ViT-B-32/openai) whose
                           weights are already in the Hugging Face cache (or ~/.cache/clip)
  ARCH/PATH                an open_clip architecture and a checkpoint file (ViT-B-32//ckpt/b32.pt)
  hf-hub:ORG/REPO          an open_clip repository already in the Hugging Face cache
  DIRECTORY                an open_clip local directory (open_clip_config.json + weights), or a
                           folder laid out like shared/models/shapes/

Missing weights raise ModelNotAvailable naming the model and how to provide it; a model is
never built with random weights.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHIPPED_DIR = Path(__file__).parent
SHAPES_DIR = SHIPPED_DIR / "shapes"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "weights.npz"  # shipped format: fp16 state dict, compressed
HEADS_FILE = "heads.npz"
METRICS_FILE = "metrics.json"
TAG_NAMES = ("watermark", "unsafe")


class ModelNotAvailable(RuntimeError):
    """The named model's files are not on this machine."""


def shipped_models() -> dict[str, str]:
    """Models that ship inside the package, with a one-line description."""
    found = {}
    for folder in sorted(SHIPPED_DIR.iterdir()):
        if (folder / CONFIG_FILE).is_file():
            metrics = _read_metrics(folder)
            found[folder.name] = metrics.get("description", "")
    return found


def _read_metrics(folder: Path) -> dict:
    path = folder / METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def suggested_min_similarity(name: str) -> float | None:
    """The similarity threshold a model ships calibrated for (metrics.json), if any.

    LAION's 0.28 / 0.26 hold for OpenAI's and LAION's CLIPs only; a model trained elsewhere
    (`shapes`) has its own scale. Reads one small json file: no torch."""
    folder = model_folder(name)
    value = _read_metrics(folder).get("suggested_min_similarity") if folder is not None else None
    return float(value) if value is not None else None


def model_folder(name: str) -> Path | None:
    """The local folder holding `name`'s files, when it is a shipped name or a directory."""
    if (SHIPPED_DIR / name / CONFIG_FILE).is_file() and "/" not in name:
        return SHIPPED_DIR / name
    if os.path.isdir(name):
        return Path(name)
    return None


def load_clip(name: str, device: str = "cpu", cache_dir: str | None = None):
    """(model, preprocess, tokenizer) for `name`, in eval mode on `device`, from this machine's
    files only (its Hugging Face cache unless `cache_dir` says otherwise)."""
    with _offline():
        model, preprocess, tokenizer = _load_clip(name, cache_dir)
    return model.to(device).eval(), preprocess, tokenizer


@contextlib.contextmanager
def _offline():
    """No hub request while a model loads (transformers' text towers would otherwise ask the
    hub for their config); the setting is put back after, so a later fetch in the same process
    still reaches the hub."""
    import huggingface_hub.constants as hub_constants
    before_env, before = os.environ.get("HF_HUB_OFFLINE"), hub_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], hub_constants.HF_HUB_OFFLINE = "1", True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = before
        if before_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before_env


def _load_clip(name: str, cache_dir: str | None):
    from clipfleet.shared.models.cache import hub_cache_dir
    folder = model_folder(name)
    if folder is not None and (folder / WEIGHTS_FILE).is_file():
        model, preprocess, tokenizer = _load_packed(folder)
    elif folder is not None:
        model, preprocess, tokenizer = _load_open_clip_dir(name, folder)
    elif name.startswith("hf-hub:"):
        model, preprocess, tokenizer = _load_open_clip_dir(
            name, _cached_hub_repo(name, cache_dir or str(hub_cache_dir())))
    elif "/" in name:
        model, preprocess, tokenizer = _load_arch(name, cache_dir or str(hub_cache_dir()))
    else:
        raise ModelNotAvailable(
            f"unknown model {name!r}: use 'shapes', an open_clip 'ARCH/pretrained' name "
            f"(e.g. ViT-B-32/openai), 'hf-hub:ORG/REPO', or a local checkpoint path")
    return model, preprocess, tokenizer


def _missing(name: str, detail: str) -> ModelNotAvailable:
    return ModelNotAvailable(
        f"weights for model {name!r} are not on this machine ({detail}). Workers never "
        f"download: fetch it once for the fleet with `clipfleet models fetch {name} --to "
        f"STORE/models` (`clipfleet run` does so before it starts), or pass a local checkpoint "
        f"path as the model name")


def _load_packed(folder: Path):
    """A folder laid out like shapes/: open_clip config plus an fp16 npz state dict."""
    import open_clip
    import torch
    from open_clip.model import CLIP

    config = json.loads((folder / CONFIG_FILE).read_text())
    model_cfg, preprocess_cfg = config["model_cfg"], config.get("preprocess_cfg", {})
    model = CLIP(**model_cfg)
    with np.load(folder / WEIGHTS_FILE) as packed:
        reference = model.state_dict()
        state = {key: torch.from_numpy(packed[key]).to(reference[key].dtype) for key in packed.files}
    model.load_state_dict(state, strict=True)
    preprocess = open_clip.image_transform(
        model_cfg["vision_cfg"]["image_size"], is_train=False,
        mean=preprocess_cfg.get("mean"), std=preprocess_cfg.get("std"),
        interpolation=preprocess_cfg.get("interpolation"),
        resize_mode=preprocess_cfg.get("resize_mode"))
    tokenizer = open_clip.SimpleTokenizer(context_length=model_cfg["text_cfg"]["context_length"])
    return model, preprocess, tokenizer


def _load_open_clip_dir(name: str, folder: Path):
    import open_clip
    from open_clip.factory import _find_checkpoint_in_dir

    if not (folder / CONFIG_FILE).is_file():
        raise _missing(name, f"{folder} has no {CONFIG_FILE}")
    if _find_checkpoint_in_dir(folder) is None:
        raise _missing(name, f"{folder} has no .safetensors, .bin or .pth weights")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    return model, preprocess, open_clip.get_tokenizer(f"local-dir:{folder}")


def _cached_hub_file(repo: str, filenames: list[str], cache_dir: str | None) -> str | None:
    from huggingface_hub import hf_hub_download

    for filename in filenames:
        try:
            return hf_hub_download(repo, filename, cache_dir=cache_dir, local_files_only=True)
        except Exception:  # not cached (the hub library raises several kinds)
            continue
    return None


def _cached_hub_repo(name: str, cache_dir: str | None) -> Path:
    repo = name[len("hf-hub:"):]
    config = _cached_hub_file(repo, [CONFIG_FILE], cache_dir)
    if config is None:
        raise _missing(name, f"{repo} is not in the Hugging Face cache")
    return Path(config).parent


def _weight_file_names(filename: str) -> list[str]:
    """The hub file for a tag, preferring its safetensors twin as open_clip does."""
    if not filename:
        return ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    stem = filename.rsplit(".", 1)[0]
    safe = ["open_clip_model.safetensors"] if filename == "open_clip_pytorch_model.bin" else []
    return safe + [f"{stem}.safetensors", filename]


def _load_arch(name: str, cache_dir: str | None):
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    arch, pretrained = name.split("/", 1)
    if arch not in open_clip.list_models():
        raise ModelNotAvailable(f"open_clip has no architecture {arch!r} (model {name!r})")
    if os.path.isfile(pretrained):
        with _hub_files_of(name):
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained)
            return model, preprocess, open_clip.get_tokenizer(arch)
    cfg = get_pretrained_cfg(arch, pretrained)
    if not cfg:
        raise ModelNotAvailable(
            f"{pretrained!r} is neither a checkpoint file nor an open_clip pretrained tag of "
            f"{arch!r} (tags: {', '.join(open_clip.list_pretrained_tags_by_model(arch))})")
    checkpoint = None
    hub = cfg.get("hf_hub", "")
    if hub:
        # "org/repo/" names the repository's default file, "org/repo/file.bin" a given one.
        repo, filename = (hub.rstrip("/"), "") if hub.endswith("/") else os.path.split(hub)
        checkpoint = _cached_hub_file(repo, _weight_file_names(filename), cache_dir)
    if checkpoint is None and cfg.get("url"):
        from clipfleet.shared.models.cache import clip_cache_dir
        candidate = clip_cache_dir() / os.path.basename(cfg["url"])
        checkpoint = str(candidate) if candidate.is_file() else None
    if checkpoint is None:
        raise _missing(name, "not in the Hugging Face cache nor in ~/.cache/clip")
    with _hub_files_of(name):
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=checkpoint, force_quick_gelu=bool(cfg.get("quick_gelu", False)),
            image_mean=cfg.get("mean"), image_std=cfg.get("std"),
            image_interpolation=cfg.get("interpolation"), image_resize_mode=cfg.get("resize_mode"))
        return model, preprocess, open_clip.get_tokenizer(arch)


@contextlib.contextmanager
def _hub_files_of(name: str):
    """Architectures with a Hugging Face text tower (xlm-roberta-base-ViT-B-32, LAION's
    multilingual filter) also need that tower's config and tokenizer from the HF cache;
    transformers says so with an OSError that does not name our model."""
    try:
        yield
    except OSError as exc:
        raise _missing(name, f"its Hugging Face text tower or tokenizer files: {exc}") from exc


# ----------------------------------------------------------------------------- tag heads


@dataclass
class TagHead:
    """A small MLP on L2-normalised image embeddings, trained as LAION trained its NSFW
    detector: labelled embeddings in, a probability out."""
    name: str
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray

    def __call__(self, embeddings: np.ndarray) -> np.ndarray:
        """Probabilities, shape (n,), for L2-normalised embeddings of shape (n, dim)."""
        hidden = np.maximum(np.asarray(embeddings, np.float32) @ self.w1 + self.b1, 0.0)
        logits = (hidden @ self.w2 + self.b2)[:, 0]
        return 1.0 / (1.0 + np.exp(-logits))


def load_tag_heads(name: str) -> dict[str, TagHead]:
    """{"watermark": TagHead, "unsafe": TagHead} shipped beside model `name`."""
    folder = model_folder(name)
    path = folder / HEADS_FILE if folder is not None else None
    if path is None or not path.is_file():
        raise ModelNotAvailable(
            f"no tag heads for model {name!r}: heads ship for 'shapes' only (as {HEADS_FILE} "
            f"beside the weights); train them on {name!r} embeddings and put {HEADS_FILE} in "
            f"its folder")
    with np.load(path) as packed:
        return {tag: TagHead(tag, *(packed[f"{tag}.{part}"].astype(np.float32)
                                    for part in ("w1", "b1", "w2", "b2")))
                for tag in TAG_NAMES}


def score_tags(heads: dict[str, TagHead], embeddings: np.ndarray) -> dict[str, np.ndarray]:
    """{"watermark": probabilities, "unsafe": probabilities} for L2-normalised embeddings."""
    return {tag: head(embeddings) for tag, head in heads.items()}
