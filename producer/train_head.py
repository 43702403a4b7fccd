"""`clipfleet train-head`: a tag head from labelled embeddings, as LAION trained its NSFW detector.

Embeddings come in clip-retrieval's layout (img_emb/img_emb_*.npy beside metadata/metadata_*.parquet
with a `key` column, rows aligned: a run's `<store>/embeddings`), labels from a parquet of `key,
label`. Binary labels (booleans or 0/1) train a probability head (sigmoid, cross-entropy), graded
ones (ratings) a regression head whose output is on the labels' own scale. A seeded quarter of
the labelled samples is held out and scored: accuracy and ROC AUC, or Spearman for graded.
The head file is a dict around a PyTorch state dict; `--tag NAME` names the column it adds
when a run lists it in `--tag-heads`.
"""
from __future__ import annotations

import io
import logging
import time

import numpy as np

from clipfleet.shared.models.heads import HEAD_FORMAT, metrics

log = logging.getLogger("clipfleet.train_head")

HIDDEN = 64
STEPS = {"binary": 400, "graded": 800}


def infer_kind(labels: np.ndarray) -> str:
    values = np.unique(np.asarray(labels, np.float64))
    return "binary" if set(values.tolist()) <= {0.0, 1.0} else "graded"


def train_head(embeddings: np.ndarray, labels: np.ndarray, kind: str | None = None, seed: int = 0,
               hidden: int = HIDDEN, steps: int | None = None, held_out: float = 0.25,
               progress=None) -> dict:
    """Train a dim->hidden->1 MLP; returns {"state_dict", "kind", "widths", "metrics"}."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.asarray(embeddings, np.float32))
    y = torch.from_numpy(np.asarray(labels, np.float32))
    if len(x) != len(y) or len(x) < 8:
        raise ValueError(f"need at least 8 labelled embeddings, got {len(x)} embeddings and {len(y)} labels")
    kind = kind or infer_kind(labels)
    steps = steps or STEPS[kind]
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = max(1, min(len(x) - 1, int(round(len(x) * (1 - held_out)))))
    train, held = order[:cut], order[cut:]
    mean, std = (float(y[train].mean()), float(y[train].std().clamp_min(1e-6))) if kind == "graded" else (0.0, 1.0)
    target = (y[train] - mean) / std
    torch.manual_seed(seed)
    head = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3, weight_decay=1e-4)
    loss_fn = F.binary_cross_entropy_with_logits if kind == "binary" else F.mse_loss
    for step in range(steps):  # full batch: a head trains on thousands of samples, not millions
        loss = loss_fn(head(x[train])[:, 0], target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if progress is not None:
            progress(step + 1, steps, float(loss.detach()))
    with torch.no_grad():
        if kind == "graded":  # fold the label scale into the last layer: outputs are ratings
            head[2].weight.mul_(std)
            head[2].bias.mul_(std).add_(mean)
        out = head(x[held])[:, 0]
        scores = torch.sigmoid(out) if kind == "binary" else out
    quality = metrics(y[held].numpy(), scores.numpy(), kind)
    quality["held_out"], quality["trained_on"] = int(len(held)), int(len(train))
    state = {k: v.detach().clone().contiguous() for k, v in head.state_dict().items()}
    return {"state_dict": state, "kind": kind, "widths": [int(x.shape[1]), hidden, 1], "metrics": quality}


def save_head(path: str, trained: dict, tag: str | None = None, **info) -> None:
    import torch
    torch.save({"format": HEAD_FORMAT, "version": 1, "tag": tag or "", **trained, **info}, path)


def read_embeddings(directory: str) -> tuple[np.ndarray, list[str]]:
    """All image embeddings and their keys under a clip-retrieval layout folder (local or s3://)."""
    import pyarrow.parquet as pq

    from clipfleet.shared.storage import Store

    store = Store(directory)
    arrays = sorted(n for n in store.list("img_emb") if n.endswith(".npy"))
    if not arrays:
        raise ValueError(f"{directory} has no img_emb/*.npy: pass a folder in clip-retrieval's layout "
                         f"(a run's <store>/embeddings)")
    chunks, keys = [], []
    for name in arrays:
        stem = name.rsplit("/", 1)[-1][len("img_emb_"):-len(".npy")]
        meta_name = f"metadata/metadata_{stem}.parquet"
        if not store.exists(meta_name):
            raise ValueError(f"{directory}: {name} has no {meta_name} beside it")
        emb = np.load(io.BytesIO(store.read_bytes(f"img_emb/{name.rsplit('/', 1)[-1]}")))
        meta = pq.read_table(io.BytesIO(store.read_bytes(meta_name)), columns=["key"])
        if meta.num_rows != len(emb):
            raise ValueError(f"{directory}: {name} has {len(emb)} rows but {meta_name} has {meta.num_rows}")
        chunks.append(emb.astype(np.float32))
        keys += meta.column("key").to_pylist()
    return np.concatenate(chunks), keys


def read_labels(path: str) -> dict[str, float]:
    import pyarrow.parquet as pq
    table = pq.read_table(path)
    if not {"key", "label"} <= set(table.column_names):
        raise ValueError(f"{path} needs columns key and label, has {', '.join(table.column_names)}")
    labels = {}
    for key, label in zip(table.column("key").to_pylist(), table.column("label").to_pylist()):
        if label is not None:
            labels[str(key)] = float(label)
    return labels


def main(args) -> int:
    from tqdm import tqdm

    started = time.monotonic()
    embeddings, keys = read_embeddings(args.embeddings)
    labels = read_labels(args.labels)
    rows = [i for i, key in enumerate(keys) if key in labels]
    unmatched = len(labels) - len(rows)
    if not rows:
        raise ValueError(f"none of the {len(labels)} labelled keys is in {args.embeddings}")
    y = np.array([labels[keys[i]] for i in rows])
    kind = None if args.kind == "auto" else args.kind
    print(f"{len(rows)} labelled embeddings ({embeddings.shape[1]}-d)"
          + (f"; {unmatched} labelled keys not found" if unmatched else ""), flush=True)
    with tqdm(total=STEPS[kind or infer_kind(y)] if not args.steps else args.steps, desc="training",
              unit="step", leave=False) as bar:
        trained = train_head(embeddings[rows], y, kind=kind, seed=args.seed, steps=args.steps,
                             progress=lambda *_: bar.update(1))
    save_head(args.out, trained, tag=args.tag, embeddings=args.embeddings, labels=args.labels)
    quality = trained["metrics"]
    if trained["kind"] == "binary":
        print(f"{trained['kind']} head: held-out accuracy {quality['accuracy']:.3f}, "
              f"ROC AUC {quality['roc_auc']:.3f} ({quality['positives']} of {quality['samples']} positive)")
    else:
        print(f"{trained['kind']} head: held-out Spearman {quality['spearman']:.3f} ({quality['samples']} samples)")
    use = f"--tag-heads {args.out}" if args.tag else f"--punsafe-head mlp:{args.out} (or another column's flag)"
    print(f"wrote {args.out} in {time.monotonic() - started:.0f}s; use it with `clipfleet run ... {use}`")
    return 0


def register(sub) -> None:
    p = sub.add_parser("train-head", help="train a tag head from labelled embeddings",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--embeddings", required=True, metavar="DIR",
                   help="embeddings in clip-retrieval's layout (img_emb/, metadata/), e.g. a run's <store>/embeddings")
    p.add_argument("--labels", required=True, metavar="PARQUET", help="parquet with key and label columns")
    p.add_argument("--out", required=True, metavar="HEAD", help="head file to write (.pt)")
    p.add_argument("--tag", metavar="NAME", help="column name the head adds when a run lists it in --tag-heads")
    p.add_argument("--kind", choices=["auto", "binary", "graded"], default="auto",
                   help="binary (probabilities) or graded (ratings) labels (default: auto, from the labels)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 400 binary, 800 graded)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split and the initial weights (default 0)")
    p.set_defaults(func=main)
