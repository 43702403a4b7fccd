"""The report's figures: matplotlib (Agg, no display) rendered to inline PNG data URIs.

Each function takes plain numbers (what producer/report.py read from the store) and returns a
`data:image/png;base64,...` string, so the HTML needs no other file and no script.
"""
from __future__ import annotations

import base64
import io

import numpy as np

# LAION-5B's published thresholds and figures, drawn beside the run's own.
LAION_PUNSAFE = 0.5
LAION_PWATERMARK = 0.8
LAION_AESTHETIC = (5.0, 6.0)   # LAION-Aesthetics 5+ and 6+
BUCKETS = ("en", "other", "none")
BUCKET_LABELS = {"en": "English", "other": "other language", "none": "no language"}
COLORS = {"en": "#1f77b4", "other": "#ff7f0e", "none": "#2ca02c"}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # never a display: the report is made on servers
    import matplotlib.pyplot as plt
    return plt


def to_data_uri(fig) -> str:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def funnel(rows: list[tuple[str, int | None, int | None]]) -> str:
    """rows: (stage, samples in, samples out); bars on a log axis, kept share written beside."""
    plt = _pyplot()
    rows = [r for r in rows if r[1] is not None]
    fig, ax = plt.subplots(figsize=(8, 0.6 + 0.55 * len(rows)))
    y = np.arange(len(rows))[::-1]
    ins = np.array([max(r[1], 1) for r in rows], float)
    outs = np.array([max(r[2] or 0, 1) if r[2] is not None else 1 for r in rows], float)
    ax.barh(y + 0.18, ins, height=0.36, color="#c7c7c7", label="in")
    ax.barh(y - 0.18, outs, height=0.36, color="#1f77b4", label="out")
    for yi, (stage, n_in, n_out) in zip(y, rows):
        share = f"{n_out:,} of {n_in:,} ({100 * n_out / n_in:.1f}%)" if n_out is not None and n_in else f"{n_in:,} in"
        ax.text(max(ins.max(), 1) * 1.3, yi, share, va="center", fontsize=9)
    ax.set_yticks(y, [r[0] for r in rows])
    ax.set_xscale("log")
    ax.set_xlim(0.8, max(ins.max(), 1) * 60)
    ax.set_xlabel("samples (log scale)")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("samples in and out of each stage")
    return to_data_uri(fig)


def languages(split: dict[str, dict[str, int]], laion: dict[str, float]) -> str:
    """split: where (e.g. "candidates (extract)") -> bucket -> count; shares as grouped bars."""
    plt = _pyplot()
    wheres = list(split) + ["LAION-5B"]
    fig, ax = plt.subplots(figsize=(8, 3.2))
    width = 0.8 / len(BUCKETS)
    for i, bucket in enumerate(BUCKETS):
        shares = []
        for where in wheres:
            counts = laion if where == "LAION-5B" else split[where]
            total = sum(counts.values()) or 1
            shares.append(100 * counts.get(bucket, 0) / total)
        xs = np.arange(len(wheres)) + (i - 1) * width
        ax.bar(xs, shares, width, color=COLORS[bucket], label=BUCKET_LABELS[bucket])
        for x, s in zip(xs, shares):
            ax.text(x, s + 1, f"{s:.0f}%", ha="center", fontsize=8)
    ax.set_xticks(np.arange(len(wheres)), wheres, fontsize=9)
    ax.set_ylabel("share of samples (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    ax.set_title("language buckets")
    return to_data_uri(fig)


def similarity(values: dict[str, np.ndarray], thresholds: dict[str, float]) -> str:
    """One histogram per language bucket, its threshold as a line, the kept share in the legend."""
    plt = _pyplot()
    present = [b for b in BUCKETS if len(values.get(b, ()))]
    fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3), squeeze=False)
    for ax, bucket in zip(axes[0], present):
        v = values[bucket]
        t = thresholds[bucket]
        ax.hist(v, bins=40, range=(min(-0.1, float(v.min())), max(1.0, float(v.max()))), color=COLORS[bucket])
        ax.axvline(t, color="black", linestyle="--", label=f"threshold {t:.2f}: {100 * (v >= t).mean():.1f}% kept")
        ax.set_title(f"{BUCKET_LABELS[bucket]} ({len(v):,} judged)")
        ax.set_xlabel("image-text cosine similarity")
        ax.legend(fontsize=8, loc="upper left")
    axes[0][0].set_ylabel("samples")
    return to_data_uri(fig)


def tag_histograms(columns: dict[str, np.ndarray]) -> str:
    """punsafe, pwatermark, aesthetic histograms with LAION's thresholds and the share above each."""
    plt = _pyplot()
    lines = {"punsafe": (LAION_PUNSAFE,), "pwatermark": (LAION_PWATERMARK,), "aesthetic": LAION_AESTHETIC}
    present = [c for c in columns if len(columns[c])]
    fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3), squeeze=False)
    for ax, name in zip(axes[0], present):
        v = columns[name]
        span = (0.0, 1.0) if name != "aesthetic" else (min(0.0, float(v.min())), max(10.0, float(v.max())))
        ax.hist(v, bins=40, range=span, color="#9467bd")
        for t in lines.get(name, ()):
            ax.axvline(t, color="black", linestyle="--", label=f"{t:g}: {100 * (v > t).mean():.1f}% above")
        ax.set_title(f"{name} ({len(v):,} samples)")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("samples")
    return to_data_uri(fig)


def image_sizes(original: np.ndarray, stored: np.ndarray, image_size: int) -> str:
    """Longest side as found on the web (log bins) and as stored."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    top = max(float(original.max()), 2.0)
    axes[0].hist(original, bins=np.geomspace(1, top * 1.05, 40), color="#8c564b")
    axes[0].set_xscale("log")
    axes[0].axvline(image_size, color="black", linestyle="--", label=f"--image-size {image_size}")
    axes[0].set_title(f"original longest side ({len(original):,} images)")
    axes[0].legend(fontsize=8)
    axes[1].hist(stored, bins=30, range=(0, max(float(stored.max()), 1.0) * 1.05), color="#17becf")
    axes[1].set_title("stored longest side")
    for ax in axes:
        ax.set_xlabel("pixels")
    axes[0].set_ylabel("images")
    return to_data_uri(fig)


def throughput(series: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    """series: stage -> (finish times in minutes since the run's first start, cumulative samples)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.2))
    for stage, (minutes, cumulative) in series.items():
        ax.step(np.concatenate([[0.0], minutes]), np.concatenate([[0], cumulative]), where="post",
                label=stage, marker="o", markersize=3)
    ax.set_xlabel("minutes since the first shard started")
    ax.set_ylabel("samples done (cumulative)")
    ax.legend(fontsize=8)
    ax.set_title("progress of each stage over time")
    return to_data_uri(fig)
