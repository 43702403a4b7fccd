"""How well the CLIP filter kept a sandbox world's right pairs, overall and per aspect-ratio band.

The filter must judge the picture, not its shape: a right caption on a 2.5:1 image is as right
as on a square one. `measure(world, store)` joins the world's ground truth (by URL) with the
store's image shards (key -> URL) and clip outputs (key -> kept) and returns precision (right
pairs among those kept), recall (kept among the right pairs) and recall per band of the
original image's width/height. Only samples the filter judged count (a sample that failed to
download, or that no model could judge, is reported apart).
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import pyarrow.parquet as pq

from clipfleet.shared import layout
from clipfleet.shared.storage import Store

# Width/height bands, symmetric in log around the square one (1.15 ~ 1/0.87, 1.4 ~ 1/0.71).
BANDS = ((0.0, 0.71, "taller than 1:1.4"), (0.71, 0.87, "1:1.4 to 1:1.15"), (0.87, 1.15, "square"),
         (1.15, 1.4, "1.15:1 to 1.4:1"), (1.4, 1.9, "1.4:1 to 1.9:1"), (1.9, math.inf, "wider than 1.9:1"))
SQUARE = "square"


def band(aspect: float) -> str:
    return next(name for low, high, name in BANDS if low <= aspect < high)


def _table(store: Store, rel: str) -> list[dict]:
    return pq.read_table(io.BytesIO(store.read_bytes(rel))).to_pylist()


def judged_pairs(world: str | Path, store_uri: str) -> tuple[list[dict], int]:
    """([{url, aspect, right, kept}] for every sample the filter judged, samples it could not)."""
    truth = {r["url"]: r for r in pq.read_table(Path(world) / "ground_truth" / "images.parquet").to_pylist()}
    store = Store(store_uri)
    judged, unjudged = [], 0
    for rel in _clip_files(store):
        shard = int(Path(rel).name.split(".")[0])
        urls = {r["key"]: r["url"] for r in _table(store, layout.image_shard(shard, "parquet"))}
        for row in _table(store, rel):
            image = truth.get(urls.get(row["key"]))
            if image is None:  # not one of the world's captioned images (a corner case, a photo link)
                continue
            if row["similarity"] is None:
                unjudged += 1
                continue
            judged.append({"url": image["url"], "aspect": image["width"] / image["height"],
                           "right": bool(image["caption_correct"]), "kept": bool(row["kept"])})
    return judged, unjudged


def _clip_files(store: Store) -> list[str]:
    folder = layout.clip_shard(0).rsplit("/", 1)[0]
    return [f"{folder}/{name}" for name in store.list(folder) if name.endswith(".parquet")]


def measure(world: str | Path, store_uri: str) -> dict:
    pairs, unjudged = judged_pairs(world, store_uri)
    kept = [p for p in pairs if p["kept"]]
    right = [p for p in pairs if p["right"]]
    result = {"judged": len(pairs), "unjudged": unjudged, "right": len(right), "kept": len(kept),
              "precision": sum(p["right"] for p in kept) / len(kept) if kept else float("nan"),
              "recall": sum(p["kept"] for p in right) / len(right) if right else float("nan"),
              "bands": {}}
    for _, _, name in BANDS:
        members = [p for p in right if band(p["aspect"]) == name]
        if members:
            result["bands"][name] = {"right": len(members),
                                     "recall": sum(p["kept"] for p in members) / len(members)}
    return result


def worst_band_gap(result: dict) -> float:
    """How far the worst band's recall falls below the square band's (points of recall, 0-1)."""
    square = result["bands"][SQUARE]["recall"]
    return max(square - b["recall"] for b in result["bands"].values())


def report(result: dict) -> str:
    lines = [f"judged {result['judged']} pairs ({result['right']} right, {result['kept']} kept; "
             f"{result['unjudged']} not judged): precision {result['precision']:.3f}, "
             f"recall {result['recall']:.3f}",
             "recall of right pairs by width/height of the original image:"]
    for name, b in result["bands"].items():
        lines.append(f"  {name:<20} {b['recall']:.3f}  ({b['right']} right pairs)")
    lines.append(f"worst band below square: {worst_band_gap(result) * 100:.1f} points")
    return "\n".join(lines)
