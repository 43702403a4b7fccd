"""Tag heads: LAION's released architectures, and the small MLPs `clipfleet train-head` makes.

A head is named by a spec, `ARCH:FILE` (or `shapes:TAG` for a head shipped with `shapes`):

  nsfw-l14:FILE          LAION's CLIP-based NSFW detector for ViT-L/14 image embeddings:
                         input normalisation, 768->64->512->256->1, ReLU between, a sigmoid
  nsfw-b32:FILE          the same for ViT-B/32: normalisation, 512->32->32->dropout->1, sigmoid
  aesthetic-l14:FILE     LAION-Aesthetics v2 (improved-aesthetic-predictor): 768->1024->128->64->16->1,
                         dropout, no activations, a 1-10 rating of L2-normalised L/14 embeddings
  watermark-effnet:FILE  LAION-5B's watermark detector: timm efficientnet_b3(a) with a
                         1536->625->256->2 classifier on 256x256 ImageNet-normalised images;
                         softmax column 0 is the watermark probability
  mlp:FILE               a head written by `clipfleet train-head` (any embedding width)
  shapes:TAG             watermark, unsafe or aesthetic, shipped beside the `shapes` CLIP

Every FILE is a PyTorch state dict (or, for mlp, the dict train-head writes around one),
loaded with `weights_only=True` and checked key by key and shape by shape against the
architecture, so a file of another architecture is refused with the keys that differ instead of
being half loaded. README "Tag heads" says how LAION's released files map onto these.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clipfleet.shared.models import HEADS_FILE, SHAPES_DIR, ModelNotAvailable, model_folder

HEAD_FORMAT = "clipfleet-head"
SHIPPED_KINDS = {"watermark": "binary", "unsafe": "binary", "aesthetic": "graded"}
ARCHITECTURES = ("nsfw-l14", "nsfw-b32", "aesthetic-l14", "watermark-effnet", "mlp", "shapes")
# LAION's watermark model input (LAION-5B-WatermarkDetection): a plain 256x256 resize.
WATERMARK_SIZE = 256
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class HeadError(ValueError):
    """A head spec or file that cannot be used, with the reason."""


# ----------------------------------------------------------------------------- architectures


def _torch_modules():
    import torch
    from torch import nn

    class LaionNsfw(nn.Module):
        """autokeras' Normalization layer (mean, variance), then the Dense stack, then a sigmoid.
        `widths` is (768, 64, 512, 256, 1) for L/14, (512, 32, 32, 1) for B/32 (dropout before
        the last layer, which changes nothing at inference)."""

        def __init__(self, widths):
            super().__init__()
            self.register_buffer("mean", torch.zeros(widths[0]))
            self.register_buffer("variance", torch.ones(widths[0]))
            layers = []
            for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
                if i:
                    layers.append(nn.ReLU())
                if i == len(widths) - 2 and len(widths) == 4:
                    layers.append(nn.Dropout(0.1))
                layers.append(nn.Linear(a, b))
            self.layers = nn.Sequential(*layers)

        def forward(self, x):
            x = (x - self.mean) / torch.sqrt(self.variance.clamp_min(1e-7))  # keras' epsilon
            return torch.sigmoid(self.layers(x))[:, 0]

    class LaionAesthetic(nn.Module):
        """improved-aesthetic-predictor's MLP, with its layer indices, so its .pth loads as is."""

        def __init__(self, dim=768):
            super().__init__()
            self.layers = nn.Sequential(
                nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

        def forward(self, x):
            return self.layers(x)[:, 0]

    class Mlp(nn.Module):
        """train-head's head: dim->hidden->1; a sigmoid for binary labels, none for graded."""

        def __init__(self, dim, hidden, binary):
            super().__init__()
            self.layers = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
            self.binary = binary

        def forward(self, x):
            out = self.layers(x)[:, 0]
            return torch.sigmoid(out) if self.binary else out

    return LaionNsfw, LaionAesthetic, Mlp


def build_watermark_model():
    """timm's efficientnet_b3 (efficientnet_b3a is its old alias) with LAION's classifier."""
    import timm
    from torch import nn

    model = timm.create_model("efficientnet_b3", pretrained=False, num_classes=2)
    model.classifier = nn.Sequential(nn.Linear(1536, 625), nn.ReLU(), nn.Dropout(p=0.3),
                                     nn.Linear(625, 256), nn.ReLU(), nn.Linear(256, 2))
    return model


def build_architecture(arch: str):
    """An empty module of `arch`, to load a state dict into (never used unloaded)."""
    LaionNsfw, LaionAesthetic, _ = _torch_modules()
    if arch == "nsfw-l14":
        return LaionNsfw((768, 64, 512, 256, 1))
    if arch == "nsfw-b32":
        return LaionNsfw((512, 32, 32, 1))
    if arch == "aesthetic-l14":
        return LaionAesthetic(768)
    if arch == "watermark-effnet":
        return build_watermark_model()
    raise HeadError(f"unknown head architecture {arch!r}; one of {', '.join(ARCHITECTURES)}")


def check_state_dict(arch: str, module, state: dict, source: str) -> None:
    """Refuse a state dict whose keys or shapes are not exactly `arch`'s, naming the first few."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()
                if not k.endswith("num_batches_tracked")}
    given = {k: tuple(getattr(v, "shape", ())) for k, v in state.items()
             if not k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = [f"{k} is {given[k]}, expected {expected[k]}" for k in sorted(set(expected) & set(given))
             if given[k] != expected[k]]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append("wrong shapes: " + "; ".join(wrong[:4]) + (" ..." if len(wrong) > 4 else ""))
        if missing:
            parts.append("missing keys: " + ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else ""))
        if unexpected:
            parts.append("unexpected keys: " + ", ".join(unexpected[:4])
                         + (" ..." if len(unexpected) > 4 else ""))
        raise HeadError(f"{source} is not a {arch} state dict ({'; '.join(parts)})")


def _read_head_bytes(path: str) -> bytes:
    """A head file's bytes, local or at a URI (s3://...: every worker of a fleet reads the same)."""
    if "://" not in path:
        if not os.path.isfile(path):
            raise HeadError(f"head file {path} does not exist")
        return Path(path).read_bytes()
    from clipfleet.shared.storage import Store
    parent, _, name = path.rstrip("/").rpartition("/")
    store = Store(parent)
    try:
        if not store.exists(name):
            raise HeadError(f"head file {path} does not exist")
        return store.read_bytes(name)
    except HeadError:
        raise
    except Exception as exc:  # unreachable or refused: say which file
        raise HeadError(f"head file {path} cannot be read: {exc}") from exc


def _load_torch_file(path: str):
    import io

    import torch
    data = _read_head_bytes(path)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors alike: say which file and why
        raise HeadError(f"head file {path} is not a PyTorch state dict: {exc}") from exc


# ----------------------------------------------------------------------------- heads


@dataclass
class Head:
    """A loaded head. `input` is "image_embedding" (an (n, dim) array of L2-normalised image
    embeddings) or "image" (PIL images); `kind` is "binary" (a probability) or "graded"."""
    spec: str
    arch: str
    input: str
    kind: str
    dim: int | None
    module: object = field(repr=False)
    info: dict = field(default_factory=dict)
    device: str = "cpu"

    def score_embeddings(self, embeddings: np.ndarray, batch_size: int = 65536) -> np.ndarray:
        import torch
        x = np.asarray(embeddings, np.float32)
        if x.ndim != 2 or (self.dim is not None and x.shape[1] != self.dim):
            raise HeadError(f"head {self.spec} takes {self.dim}-d embeddings, got shape {x.shape}")
        out = []
        with torch.inference_mode():
            for start in range(0, len(x), batch_size):
                out.append(self.module(torch.from_numpy(x[start:start + batch_size])).float().numpy())
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def score_images(self, pictures, batch_size: int = 32) -> np.ndarray:
        import torch
        from torchvision import transforms
        prep = transforms.Compose([transforms.Resize((WATERMARK_SIZE, WATERMARK_SIZE)),
                                   transforms.ToTensor(),
                                   transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        out = []
        with torch.inference_mode():
            for start in range(0, len(pictures), batch_size):
                batch = torch.stack([prep(p.convert("RGB")) for p in pictures[start:start + batch_size]])
                logits = self.module(batch.to(self.device))
                out.append(torch.softmax(logits.float(), dim=1)[:, 0].cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, np.float32)


def parse_spec(spec: str) -> tuple[str, str]:
    """("nsfw-l14", "/path") from "nsfw-l14:/path"; a bare path is an mlp head file."""
    arch, sep, rest = spec.partition(":")
    if sep and arch in ARCHITECTURES:
        if not rest:
            raise HeadError(f"head {spec!r} names no file")
        return arch, rest
    if spec.endswith((".pt", ".pth")) and not (sep and "/" not in arch):
        return "mlp", spec
    raise HeadError(f"head {spec!r}: write ARCH:FILE with ARCH one of {', '.join(ARCHITECTURES)}, "
                    f"or shapes:TAG (TAG one of {', '.join(SHIPPED_KINDS)})")


def shipped_head(folder: Path, tag: str, spec: str | None = None) -> Head:
    """Head TAG of the heads.npz in a model folder laid out like shapes/."""
    return _shipped_mlp(Path(folder), tag, spec or f"shapes:{tag}")


def _shipped_mlp(folder: Path, tag: str, spec: str) -> Head:
    import torch
    _, _, Mlp = _torch_modules()
    path = folder / HEADS_FILE
    if not path.is_file():
        raise HeadError(f"head {spec}: no {HEADS_FILE} in {folder}")
    with np.load(path) as packed:
        if f"{tag}.w1" not in packed.files:
            raise HeadError(f"head {spec}: {path} has no {tag!r} head "
                            f"(it has {', '.join(sorted({k.split('.')[0] for k in packed.files}))})")
        w1, b1, w2, b2 = (packed[f"{tag}.{part}"].astype(np.float32) for part in ("w1", "b1", "w2", "b2"))
    module = Mlp(w1.shape[0], w1.shape[1], SHIPPED_KINDS.get(tag, "binary") == "binary")
    module.load_state_dict({"layers.0.weight": torch.from_numpy(w1.T.copy()), "layers.0.bias": torch.from_numpy(b1),
                            "layers.2.weight": torch.from_numpy(w2.T.copy()), "layers.2.bias": torch.from_numpy(b2)})
    return Head(spec, "mlp", "image_embedding", SHIPPED_KINDS.get(tag, "binary"), int(w1.shape[0]),
                module.eval(), {"tag": tag, "file": str(path)})


def _mlp_file(path: str, spec: str) -> Head:
    _, _, Mlp = _torch_modules()
    saved = _load_torch_file(path)
    if not isinstance(saved, dict) or saved.get("format") != HEAD_FORMAT:
        raise HeadError(f"{path} is not a head written by clipfleet train-head "
                        f"(no format={HEAD_FORMAT!r} entry); LAION's heads take ARCH:FILE specs")
    state = saved["state_dict"]
    dim, hidden = (int(n) for n in saved["widths"][:2])
    module = Mlp(dim, hidden, saved["kind"] == "binary")
    check_state_dict("mlp", module, {f"layers.{k}": v for k, v in state.items()}, path)
    module.load_state_dict({f"layers.{k}": v for k, v in state.items()})
    info = {k: saved[k] for k in ("tag", "metrics", "embeddings", "labels") if k in saved}
    return Head(spec, "mlp", "image_embedding", saved["kind"], dim, module.eval(), info)


def load_head(spec: str, device: str | None = None) -> Head:
    """The head named by `spec` (see the module doc), ready to score."""
    arch, rest = parse_spec(spec)
    if arch == "shapes":
        return _shipped_mlp(SHAPES_DIR, rest, spec)
    if arch == "mlp":
        return _mlp_file(rest, spec)
    module = build_architecture(arch)
    state = _load_torch_file(rest)
    if isinstance(state, dict) and "state_dict" in state and not any(k.startswith("layers") for k in state):
        state = state["state_dict"]  # a checkpoint that wraps its state dict
    if not isinstance(state, dict):
        raise HeadError(f"{rest} holds a {type(state).__name__}, not a state dict")
    check_state_dict(arch, module, state, rest)
    module.load_state_dict(state, strict=True)
    module.eval()
    if arch == "watermark-effnet":
        import torch
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return Head(spec, arch, "image", "binary", None, module.to(device), {"file": rest}, device)
    dim = module.state_dict()["layers.0.weight"].shape[1]
    return Head(spec, arch, "image_embedding", "graded" if arch.startswith("aesthetic") else "binary",
                int(dim), module, {"file": rest})


def shipped_head_spec(embed_model: str, tag: str) -> str | None:
    """`shapes:TAG` when `embed_model` is a model whose folder ships a TAG head, else None."""
    folder = model_folder(embed_model)
    if folder is None or not (folder / HEADS_FILE).is_file():
        return None
    with np.load(folder / HEADS_FILE) as packed:
        has = f"{tag}.w1" in packed.files
    if not has:
        return None
    return f"shapes:{tag}" if folder.resolve() == SHAPES_DIR.resolve() else None


def embedding_dim(model: str) -> int | None:
    """The width of `model`'s embeddings from its config alone (no weights), or None if unknown."""
    folder = model_folder(model)
    if folder is not None:
        config = folder / "open_clip_config.json"
        if config.is_file():
            return int(json.loads(config.read_text())["model_cfg"]["embed_dim"])
        return None
    if "/" in model and not model.startswith("hf-hub:"):
        try:
            import open_clip
            cfg = open_clip.get_model_config(model.split("/", 1)[0])
        except Exception:  # an architecture open_clip does not know: the stage checks the data
            return None
        return int(cfg["embed_dim"]) if cfg else None
    return None


def metrics(labels: np.ndarray, scores: np.ndarray, kind: str) -> dict:
    """Held-out quality: accuracy at 0.5 and ROC AUC for binary labels, Spearman for graded."""
    labels, scores = np.asarray(labels, np.float64), np.asarray(scores, np.float64)
    if kind == "binary":
        truth = labels >= 0.5
        return {"accuracy": float(((scores >= 0.5) == truth).mean()), "roc_auc": roc_auc(truth, scores),
                "samples": int(len(labels)), "positives": int(truth.sum())}
    return {"spearman": spearman(labels, scores), "samples": int(len(labels))}


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their mean rank."""
    import pandas as pd
    return pd.Series(values).rank(method="average").to_numpy()


def roc_auc(truth: np.ndarray, scores: np.ndarray) -> float:
    """The chance a positive outscores a negative, ties counting half (Mann-Whitney U)."""
    truth = np.asarray(truth, bool)
    positives, negatives = int(truth.sum()), int((~truth).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = _ranks(np.asarray(scores, np.float64))
    return float((ranks[truth].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = _ranks(np.asarray(a, np.float64)), _ranks(np.asarray(b, np.float64))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


__all__ = ["Head", "HeadError", "ModelNotAvailable", "load_head", "parse_spec", "build_architecture",
           "check_state_dict", "shipped_head_spec", "embedding_dim", "metrics", "roc_auc", "spearman"]
