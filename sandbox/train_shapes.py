"""Train `shapes`, the project's small CLIP, and its two tag heads, on sandbox images.

    python -m sandbox.train_shapes --out shared/models/shapes

One command, seeded, CPU only: about 15 minutes on two idle CPU threads (the shipped
run took 35 minutes on a busy shared machine). It writes into --out:
  open_clip_config.json  open_clip model config (ModifiedResNet [1,1,1,1] width 32 at 64 px,
                         a 3-layer text transformer, 128-d embeddings) and preprocessing
  weights.npz            the state dict in fp16, compressed; token rows no sandbox caption
                         uses are zero, which is what keeps the file small
  heads.npz              watermark, unsafe and aesthetic MLP heads on L2-normalised image
                         embeddings (retrain them alone with python -m clipfleet.sandbox.train_heads)
  metrics.json           training settings and the evaluation on a fresh sample
  README.md              what the model is and how it was made

Captions are drawn afresh every step in seven languages, with and without the background
and the watermark mentioned, so the image embedding has to carry colour, shape, background
and watermark.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clipfleet.sandbox import images
from clipfleet.sandbox.evaluate import Drawn, evaluate_loaded

MODEL_CFG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 32},
    # Byte-level BPE spends many tokens on Cyrillic and CJK: 128 fits every caption.
    "text_cfg": {"context_length": 128, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
}
PREPROCESS_CFG = {"mean": [0.48145466, 0.4578275, 0.40821073],
                  "std": [0.26862954, 0.26130258, 0.27577711],
                  "interpolation": "bicubic", "resize_mode": "shortest"}


def build_model():
    import open_clip
    from open_clip.model import CLIP

    model = CLIP(**MODEL_CFG)
    preprocess = open_clip.image_transform(
        MODEL_CFG["vision_cfg"]["image_size"], is_train=False, mean=PREPROCESS_CFG["mean"],
        std=PREPROCESS_CFG["std"], interpolation=PREPROCESS_CFG["interpolation"],
        resize_mode=PREPROCESS_CFG["resize_mode"])
    tokenizer = open_clip.SimpleTokenizer(context_length=MODEL_CFG["text_cfg"]["context_length"])
    return model, preprocess, tokenizer


# ----------------------------------------------------------------------------- data


def draw_training_set(count: int, seed: int, preprocess) -> tuple[torch.Tensor, list[Drawn]]:
    """`count` pictures already resized and cropped as the model sees them, as uint8."""
    geometry = preprocess.transforms[:2]  # resize and centre crop; normalising comes later
    pixels = np.empty((count, 64, 64, 3), np.uint8)
    drawn = []
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        color = str(rng.choice(list(images.COLORS)))
        shape = str(rng.choice(images.SHAPES))
        unsafe = rng.random() < 0.15
        background = images.UNSAFE_BACKGROUND if unsafe else str(rng.choice(images.BACKGROUNDS))
        item = Drawn(color, shape, background, bool(rng.random() < 0.25))
        side = int(np.exp(rng.uniform(math.log(64), math.log(320))))
        aspect = float(rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9, 3 / 4, 2 / 3]))
        width, height = (int(side * aspect), side) if aspect >= 1 else (side, int(side / aspect))
        picture = images.render(color, shape, background, width, height, rng, item.watermark)
        if rng.random() < 0.5:  # most web images are JPEG: learn to look past its artefacts
            picture = Image.open(io.BytesIO(images.encode(picture, "jpeg", rng)))
        for step in geometry:
            picture = step(picture)
        pixels[index] = np.asarray(picture.convert("RGB"))
        drawn.append(item)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), drawn


def training_caption(item: Drawn, rng: random.Random) -> str:
    language = rng.choice(images.LANGUAGES)
    background = item.background if rng.random() < 0.7 else None
    watermark = item.watermark and rng.random() < 0.7
    return images.caption(item.color, item.shape, background, language,
                          rng.randrange(images.TEMPLATE_COUNT), watermark)


def all_caption_tokens(tokenizer) -> set[int]:
    """Every token id any sandbox caption can use, plus start and end of text."""
    used = {tokenizer.sot_token_id, tokenizer.eot_token_id}
    for language in images.LANGUAGES:
        for color in images.COLORS:
            for shape in images.SHAPES:
                for background in (*images.BACKGROUNDS, images.UNSAFE_BACKGROUND, None):
                    for template in range(images.TEMPLATE_COUNT):
                        for watermark in (False, True):
                            text = images.caption(color, shape, background, language, template,
                                                  watermark)
                            used.update(tokenizer.encode(text))
    return used


# ----------------------------------------------------------------------------- training


def _encode_text_cut(model, tokens: torch.Tensor) -> torch.Tensor:
    """model.encode_text(tokens, normalize=True) computed on the tokens up to the longest
    caption: the causal mask makes the padding after each end token irrelevant."""
    length = int((tokens != 0).sum(dim=1).max())
    cut = tokens[:, :length]
    x = model.token_embedding(cut) + model.positional_embedding[:length]
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    x = x[torch.arange(len(cut)), cut.argmax(dim=-1)]  # the end token has the highest id
    return F.normalize(x @ model.text_projection, dim=-1)


def encode_text_fast(model, tokens: torch.Tensor, groups: int = 4) -> torch.Tensor:
    """The same as model.encode_text(normalize=True), about twice as fast in training:
    captions are grouped by length so short ones are not padded to Russian's 100+ tokens."""
    order = (tokens != 0).sum(dim=1).argsort()
    parts = [_encode_text_cut(model, tokens[index]) for index in order.chunk(groups)]
    return torch.cat(parts)[order.argsort()]



def train_clip(model, tokenizer, pixels, drawn, steps: int, batch_size: int, lr: float,
               seed: int, log=print) -> None:
    generator = torch.Generator().manual_seed(seed)
    caption_rng = random.Random(seed)
    mean = torch.tensor(PREPROCESS_CFG["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(PREPROCESS_CFG["std"]).view(1, 3, 1, 1)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embedding" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup
        else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    model.train()
    started = time.monotonic()
    for step in range(steps):
        index = torch.randint(len(drawn), (batch_size,), generator=generator)
        batch = pixels[index].float() / 255.0
        flip = torch.rand(batch_size, generator=generator) < 0.5
        batch[flip] = batch[flip].flip(-1)
        batch = (batch - mean) / std
        tokens = tokenizer([training_caption(drawn[i], caption_rng) for i in index.tolist()])
        image_features = model.encode_image(batch, normalize=True)
        text_features = encode_text_fast(model, tokens)
        scale = model.logit_scale.exp()
        logits = scale * image_features @ text_features.T
        labels = torch.arange(batch_size)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 25 == 0 or step == steps - 1:
            log(f"step {step:4d}/{steps}  loss {loss.item():.3f}  scale {scale.item():5.1f}  "
                f"{time.monotonic() - started:5.0f}s")
    model.eval()


def train_tag_heads(model, preprocess, count: int, seed: int, log=print) -> tuple[dict, dict]:
    """The watermark, unsafe and aesthetic heads, trained as sandbox/train_heads.py trains them
    (that script retrains them alone, on the shipped CLIP)."""
    from clipfleet.sandbox.train_heads import train_shipped_heads
    return train_shipped_heads(model, preprocess, count, seed, log=log)


# ----------------------------------------------------------------------------- saving


def save_weights(model, used_tokens: set[int], path: Path) -> None:
    state = {}
    for key, value in model.state_dict().items():
        value = value.detach().clone()
        if key == "token_embedding.weight":
            unused = torch.ones(value.shape[0], dtype=torch.bool)
            unused[sorted(used_tokens)] = False
            value[unused] = 0
        state[key] = value.half().numpy() if value.is_floating_point() else value.numpy()
    np.savez_compressed(path, **state)


README = """# shapes: the project's small CLIP

A CLIP with open_clip's ModifiedResNet image tower (layers [1, 1, 1, 1], width 32, 64 px
input) and a 3-layer, 128-wide text transformer, 128-d embeddings, trained from scratch on
sandbox images (coloured shapes on textured backgrounds) with captions in en, fr, de, es,
ru, zh and ja. It exists so tests and `clipfleet demo` can check filtering, tagging and search
for meaning without internet; it knows nothing outside the sandbox world.

Load it with `shared.models.load_clip("shapes")`; check it with
`clipfleet models eval --model shapes`. Rebuild it (CPU, seeded) with

    python -m sandbox.train_shapes --out shared/models/shapes

Files: open_clip_config.json (model and preprocessing config), weights.npz (fp16 state dict;
token rows no sandbox caption uses are zero), heads.npz (watermark, unsafe and aesthetic MLP
heads on L2-normalised image embeddings; retrain them alone, CLIP untouched, with
`python -m clipfleet.sandbox.train_heads --out shared/models/shapes`), metrics.json (training
settings and evaluation).
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write the model into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--train-images", type=int, default=16000)
    parser.add_argument("--head-images", type=int, default=3840)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.monotonic()
    model, preprocess, tokenizer = build_model()
    print(f"drawing {args.train_images} training images", flush=True)
    pixels, drawn = draw_training_set(args.train_images, args.seed, preprocess)
    print(f"drawn in {time.monotonic() - started:.0f}s; training", flush=True)
    train_clip(model, tokenizer, pixels, drawn, args.steps, args.batch_size, args.lr, args.seed,
               log=lambda line: print(line, flush=True))
    head_weights, head_metrics = train_tag_heads(model, preprocess, args.head_images,
                                                 args.seed + 1_000, log=print)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG}, indent=2) + "\n")
    save_weights(model, all_caption_tokens(tokenizer), out / "weights.npz")
    np.savez_compressed(out / "heads.npz", **head_weights)

    # Evaluate what was saved, loaded back the way users load it.
    from clipfleet.shared.models import load_clip, load_tag_heads

    loaded, loaded_preprocess, loaded_tokenizer = load_clip(str(out))
    evaluation = evaluate_loaded(loaded, loaded_preprocess, loaded_tokenizer,
                                 load_tag_heads(str(out)), per_class=10, seed=args.seed + 2_000)
    metrics = {
        "description": "small CLIP trained on sandbox shapes (7 languages); tests and demo only",
        "training": {"seed": args.seed, "steps": args.steps, "batch_size": args.batch_size,
                     "lr": args.lr, "train_images": args.train_images,
                     "head_images": args.head_images, "threads": args.threads,
                     "seconds": round(time.monotonic() - started)},
        "tag_heads_held_out": head_metrics,
        "evaluation": evaluation,
        "suggested_min_similarity": round(evaluation["cosine"]["best_threshold"], 3),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "README.md").write_text(README)
    from clipfleet.sandbox.evaluate import print_report
    print_report({"model": str(out), **evaluation})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
