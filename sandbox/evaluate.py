"""`clipfleet models eval`: check a CLIP model for meaning on a fresh sandbox sample.

Reports zero-shot accuracy over the 48 colour x shape classes in each caption language,
the mean cosine of matched versus mismatched image-caption pairs, and, where the model has
tag heads, their accuracy and ROC AUC on the same sample.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from clipfleet.sandbox import images
from clipfleet.sandbox.web import FORMAT_WEIGHTS, web_size

CLASSES = [(color, shape) for color in images.COLORS for shape in images.SHAPES]


@dataclass
class Drawn:
    """What a sample picture shows."""
    color: str
    shape: str
    background: str
    watermark: bool
    aesthetic: float = float("nan")  # the 1-10 stand-in rating (images.aesthetic_rating)

    @property
    def unsafe(self) -> bool:
        return self.background == images.UNSAFE_BACKGROUND


def draw_sample(per_class: int, seed: int, watermark_share: float = 0.25,
                unsafe_share: float = 0.25) -> tuple[list[Image.Image], list[Drawn]]:
    """`per_class` pictures of each class, sized and encoded as the sandbox web serves them."""
    pictures, drawn = [], []
    for index in range(per_class * len(CLASSES)):
        rng = np.random.default_rng([seed, index])
        color, shape = CLASSES[index % len(CLASSES)]
        unsafe = rng.random() < unsafe_share
        background = images.UNSAFE_BACKGROUND if unsafe else str(rng.choice(images.BACKGROUNDS))
        item = Drawn(color, shape, background, bool(rng.random() < watermark_share))
        width, height = web_size(rng)
        details = {}
        picture = images.render(color, shape, background, width, height, rng, item.watermark,
                                details=details)
        item.aesthetic = details["aesthetic"]
        fmt = str(rng.choice(list(FORMAT_WEIGHTS), p=list(FORMAT_WEIGHTS.values())))
        served = images.encode(picture, fmt, rng)
        pictures.append(Image.open(io.BytesIO(served)).convert("RGB"))
        drawn.append(item)
    return pictures, drawn


@torch.no_grad()
def embed_images(model, preprocess, pictures, batch_size: int = 128) -> np.ndarray:
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(pictures), batch_size):
        batch = torch.stack([preprocess(p) for p in pictures[start:start + batch_size]]).to(device)
        chunks.append(model.encode_image(batch, normalize=True).float().cpu().numpy())
    return np.concatenate(chunks)


@torch.no_grad()
def embed_texts(model, tokenizer, texts: list[str], batch_size: int = 256) -> np.ndarray:
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[start:start + batch_size]).to(device)
        chunks.append(model.encode_text(tokens, normalize=True).float().cpu().numpy())
    return np.concatenate(chunks)


def zero_shot_accuracy(model, tokenizer, image_embeddings, drawn) -> dict[str, float]:
    """Per caption language: pick the class whose prompt is nearest each image."""
    truth = np.array([CLASSES.index((d.color, d.shape)) for d in drawn])
    accuracy = {}
    for language in images.LANGUAGES:
        prompts = [images.caption(color, shape, None, language) for color, shape in CLASSES]
        predicted = (image_embeddings @ embed_texts(model, tokenizer, prompts).T).argmax(axis=1)
        accuracy[language] = float((predicted == truth).mean())
    return accuracy


def matched_and_mismatched(model, tokenizer, image_embeddings, drawn, seed: int):
    """Cosines of each image with a right caption and with one wrong in colour and shape."""
    rng = np.random.default_rng(seed)
    right, wrong = [], []
    for item in drawn:
        language = str(rng.choice(images.LANGUAGES))
        template = int(rng.integers(images.TEMPLATE_COUNT))
        other_color = str(rng.choice([c for c in images.COLORS if c != item.color]))
        other_shape = str(rng.choice([s for s in images.SHAPES if s != item.shape]))
        right.append(images.caption(item.color, item.shape, item.background, language, template))
        wrong.append(images.caption(other_color, other_shape, item.background, language, template))
    matched = (image_embeddings * embed_texts(model, tokenizer, right)).sum(axis=1)
    mismatched = (image_embeddings * embed_texts(model, tokenizer, wrong)).sum(axis=1)
    return matched, mismatched


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: the chance a positive outscores a negative (ties count half)."""
    labels = np.asarray(labels, bool)
    positives, negatives = scores[labels], scores[~labels]
    if len(positives) == 0 or len(negatives) == 0:
        return float("nan")
    greater = (positives[:, None] > negatives[None, :]).sum()
    ties = (positives[:, None] == negatives[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(positives) * len(negatives)))


def best_threshold(matched: np.ndarray, mismatched: np.ndarray) -> float:
    """The cosine that best separates matched from mismatched pairs (midpoint of the cut)."""
    values = np.sort(np.concatenate([matched, mismatched]))
    cuts = (values[:-1] + values[1:]) / 2
    correct = [(matched >= cut).sum() + (mismatched < cut).sum() for cut in cuts]
    return float(cuts[int(np.argmax(correct))])


def tag_head_scores(heads, image_embeddings, drawn) -> dict[str, dict]:
    truths = {"watermark": np.array([d.watermark for d in drawn]),
              "unsafe": np.array([d.unsafe for d in drawn])}
    scores = {}
    for tag, head in heads.items():
        probability = head(image_embeddings)
        truth = truths[tag]
        scores[tag] = {"accuracy": float(((probability >= 0.5) == truth).mean()),
                       "roc_auc": roc_auc(truth, probability),
                       "samples": int(len(truth)), "positives": int(truth.sum())}
    return scores


def evaluate_loaded(model, preprocess, tokenizer, heads=None, per_class: int = 10,
                    seed: int = 12345, aesthetic_head=None) -> dict:
    pictures, drawn = draw_sample(per_class, seed)
    image_embeddings = embed_images(model, preprocess, pictures)
    zero_shot = zero_shot_accuracy(model, tokenizer, image_embeddings, drawn)
    matched, mismatched = matched_and_mismatched(model, tokenizer, image_embeddings, drawn, seed)
    result = {
        "samples": len(drawn),
        "zero_shot": {**zero_shot, "mean": float(np.mean(list(zero_shot.values())))},
        "cosine": {"matched": float(matched.mean()), "mismatched": float(mismatched.mean()),
                   "matched_above_mismatched": float((matched > mismatched).mean()),
                   "best_threshold": best_threshold(matched, mismatched)},
    }
    if heads:
        result["tag_heads"] = tag_head_scores(heads, image_embeddings, drawn)
    if aesthetic_head is not None:  # graded: Spearman against the 1-10 stand-in rating
        from clipfleet.shared.models.heads import spearman
        result["aesthetic_head"] = {"spearman": spearman([d.aesthetic for d in drawn],
                                                         aesthetic_head.score_embeddings(image_embeddings)),
                                    "samples": len(drawn)}
    return result


class EvaluationError(RuntimeError):
    """The model or device asked for is not there; the message says which and what to pass."""


# What a checkpoint file's name ends with: such a name is a path, never an open_clip name.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".npz")


def check_model_name(name: str) -> None:
    """Refuse a name that cannot be a model before any loading starts: none given, a path (a
    checkpoint's file name, or a name starting ./ / ~) to nothing, alone or as ARCH/path, or a
    checkpoint file without the architecture load_clip needs with it."""
    if not name.strip():
        raise EvaluationError("no model name given: pass --model shapes, an open_clip 'ARCH/pretrained' "
                              "name, or a local path")
    bare = name.startswith((".", "/", "~")) or os.path.exists(name)
    path = name if bare or "/" not in name else name.split("/", 1)[1]  # ARCH/checkpoint
    if (path.lower().endswith(CHECKPOINT_SUFFIXES) or path.startswith((".", "/", "~"))) \
            and not os.path.exists(os.path.expanduser(path)):
        raise EvaluationError(f"model file {path} does not exist")
    if bare and os.path.isfile(os.path.expanduser(name)):
        raise EvaluationError(f"{name} is a checkpoint file: name its open_clip architecture too, "
                              f"as ARCH/{name} (e.g. ViT-B-32/{name})")


def check_device(device: str) -> torch.device:
    try:
        chosen = torch.device(device)
    except RuntimeError as exc:
        raise EvaluationError(f"unknown device {device!r}: {exc}") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationError(f"device {device} is not available on this machine (no CUDA GPU); use --device cpu")
    return chosen


def evaluate_model(name: str, per_class: int = 10, seed: int = 12345, device: str = "cpu") -> dict:
    from clipfleet.shared.models import ModelNotAvailable, load_clip, load_tag_heads

    check_model_name(name)
    check_device(device)
    try:
        model, preprocess, tokenizer = load_clip(name, device=device)
    except ModelNotAvailable as exc:
        raise EvaluationError(str(exc)) from exc
    except Exception as exc:  # a file that is there but is no checkpoint open_clip can read
        raise EvaluationError(f"model {name} could not be loaded: {exc.__class__.__name__}: {exc}") from exc
    try:
        heads = load_tag_heads(name)
    except ModelNotAvailable:
        heads = None
    return {"model": name, **evaluate_loaded(model, preprocess, tokenizer, heads, per_class, seed,
                                             _aesthetic_head(name))}


def _aesthetic_head(name: str):
    """The aesthetic head shipped beside a model laid out like shapes/, if it has one."""
    from clipfleet.shared.models import model_folder
    from clipfleet.shared.models.heads import HeadError, shipped_head
    folder = model_folder(name)
    try:
        return shipped_head(folder, "aesthetic") if folder is not None else None
    except HeadError:
        return None


def print_report(result: dict) -> None:
    zero_shot = result["zero_shot"]
    cosine = result["cosine"]
    print(f"model: {result.get('model', '?')}   fresh sample: {result['samples']} images")
    print(f"zero-shot accuracy over {len(CLASSES)} colour x shape classes, by prompt language:")
    print("  " + "  ".join(f"{language} {zero_shot[language]:.3f}" for language in images.LANGUAGES)
          + f"   mean {zero_shot['mean']:.3f}")
    print(f"cosine, image vs caption: matched {cosine['matched']:.3f}, "
          f"mismatched {cosine['mismatched']:.3f} (gap {cosine['matched'] - cosine['mismatched']:.3f}; "
          f"matched higher for {cosine['matched_above_mismatched']:.1%} of images; "
          f"best separating threshold {cosine['best_threshold']:.3f})")
    for tag, scores in result.get("tag_heads", {}).items():
        print(f"tag head {tag:<9} accuracy {scores['accuracy']:.3f}  ROC AUC {scores['roc_auc']:.3f}"
              f"  ({scores['positives']} of {scores['samples']} positive)")
    if "aesthetic_head" in result:
        print(f"aesthetic head  Spearman {result['aesthetic_head']['spearman']:.3f} against the sandbox's "
              f"1-10 rating ({result['aesthetic_head']['samples']} images)")
    if "tag_heads" not in result:
        print("tag heads: none for this model")
