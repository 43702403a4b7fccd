"""Retrain only the tag heads shipped with `shapes` (watermark, unsafe, aesthetic), not the CLIP.

    python -m clipfleet.sandbox.train_heads --out shared/models/shapes

Draws a fresh sandbox sample (half watermarked, half on the unsafe hazard background, every
subject size), embeds it with the shipped CLIP, trains each head with the same code as
`clipfleet train-head`, writes heads.npz, and records held-out and fresh-sample scores in
metrics.json. Seeded, CPU, about five minutes on two idle cores.

Every head sees each picture as served, which is also what the CLIP sees of a picture stored
with --resize-mode keep_ratio (sandbox runs use it). The watermark and unsafe heads also see it
as stored with the download stage's default options (img2dataset's "border" mode, 256 px), so a
run with the defaults is tagged too; the aesthetic rating is defined on the short side, which
border padding distorts (see images.aesthetic_rating), so that head sees served pictures only.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from clipfleet.sandbox.evaluate import draw_sample, embed_images

TAGS = ("watermark", "unsafe", "aesthetic")
# Heads trained on both presentations; the others on served pictures only.
BOTH_PRESENTATIONS = ("watermark", "unsafe")


def as_stored(pictures):
    """Each picture as the download stage stores it with its default options."""
    import io

    from PIL import Image

    from clipfleet.workers.download.options import DownloadOptions
    from clipfleet.workers.download.resize import resize_image
    options = DownloadOptions()
    out = []
    for picture in pictures:
        served = io.BytesIO()
        picture.save(served, "PNG", compress_level=1)  # lossless: the same pixels as served
        out.append(Image.open(io.BytesIO(resize_image(served.getvalue(), options).data)).convert("RGB"))
    return out


def labels_of(drawn, tag: str) -> np.ndarray:
    return np.array([float(getattr(d, tag)) for d in drawn])


def train_shipped_heads(model, preprocess, count: int, seed: int, log=print) -> tuple[dict, dict]:
    """heads.npz arrays ({tag}.w1, .b1, .w2, .b2) and each head's held-out scores."""
    from clipfleet.producer.train_head import train_head

    pictures, drawn = draw_sample(max(1, count // 48), seed, watermark_share=0.5, unsafe_share=0.5)
    stored = embed_images(model, preprocess, as_stored(pictures))
    served = embed_images(model, preprocess, pictures)
    del pictures
    weights, scores = {}, {}
    for tag in TAGS:
        labels = labels_of(drawn, tag)
        if tag in BOTH_PRESENTATIONS:
            # A picture's two views may fall on both sides of the held-out split, so the
            # fresh-sample scores in metrics.json are the ones to trust.
            embeddings, labels = np.concatenate([stored, served]), np.concatenate([labels, labels])
        else:
            embeddings = served
        trained = train_head(embeddings, labels, seed=seed)
        state = trained["state_dict"]
        weights.update({f"{tag}.w1": state["0.weight"].numpy().T.copy(), f"{tag}.b1": state["0.bias"].numpy(),
                        f"{tag}.w2": state["2.weight"].numpy().T.copy(), f"{tag}.b2": state["2.bias"].numpy()})
        scores[tag] = trained["metrics"]
        log(f"tag head {tag}: held-out {json.dumps({k: round(v, 4) for k, v in trained['metrics'].items()})}")
    return weights, scores


def fresh_scores(folder: str, per_class: int, seed: int) -> dict:
    """Each shipped head on a fresh sample drawn as the sandbox web draws it."""
    from clipfleet.shared.models import load_clip
    from clipfleet.shared.models.heads import metrics, shipped_head

    model, preprocess, _ = load_clip(folder)
    pictures, drawn = draw_sample(per_class, seed)
    presentations = {"stored": embed_images(model, preprocess, as_stored(pictures)),
                     "served": embed_images(model, preprocess, pictures)}
    out = {}
    for tag in TAGS:
        head = shipped_head(folder, tag)
        for name, embeddings in presentations.items():
            if name == "served" or tag in BOTH_PRESENTATIONS:
                out[tag if name == "served" else f"{tag}_as_stored_with_border"] = metrics(
                    labels_of(drawn, tag), head.score_embeddings(embeddings), head.kind)
    return out


def main(argv: list[str] | None = None) -> int:
    import torch

    from clipfleet.shared.models import load_clip

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the model folder whose heads.npz and metrics.json to rewrite")
    parser.add_argument("--seed", type=int, default=1000, help="sample and training seed (default 1000, as train_shapes uses)")
    parser.add_argument("--head-images", type=int, default=3840, help="images to train and hold out on")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    out = Path(args.out)
    model, preprocess, _ = load_clip(str(out))
    weights, held_out = train_shipped_heads(model, preprocess, args.head_images, args.seed)
    np.savez_compressed(out / "heads.npz", **weights)
    fresh = fresh_scores(str(out), per_class=10, seed=args.seed + 1000)
    path = out / "metrics.json"
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    recorded["tag_heads_held_out"] = held_out
    recorded.setdefault("evaluation", {})["tag_heads"] = fresh
    recorded["heads_training"] = {"seed": args.seed, "head_images": args.head_images,
                                  "script": "python -m clipfleet.sandbox.train_heads",
                                  "seconds": round(time.monotonic() - started)}
    path.write_text(json.dumps(recorded, indent=2) + "\n")
    for tag, scores in fresh.items():
        print(f"fresh sample, {tag}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in scores.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
