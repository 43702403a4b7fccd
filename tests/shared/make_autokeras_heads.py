"""Writes tests/shared/data/autokeras_nsfw_{l14,b32}.zip: Keras models with the layer names,
shapes and save format of LAION's released CLIP-based NSFW detectors (autokeras 1.x saved them
with tf.keras' `model.save(DIR)`, a TensorFlow SavedModel, zipped), random weights, and beside
each the outputs TensorFlow gives on probe embeddings, so the import test compares outputs
without TensorFlow in the test environment.

Run with TensorFlow and tf-keras installed (any venv; not a clipfleet dependency):
    python tests/shared/make_autokeras_heads.py
"""
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import tensorflow as tf
import tf_keras as keras

OUT = Path(__file__).parent / "data"
# LAION's two detectors: L/14 768->64->512->256->1, B/32 512->32->32->(dropout)->1.
SHAPES = {"l14": ("clip_autokeras_binary_nsfw", (768, 64, 512, 256, 1), False),
          "b32": ("clip_autokeras_nsfw_b32", (512, 32, 32, 1), True)}


def build(widths, dropout, seed):
    rng = np.random.default_rng(seed)
    inputs = keras.Input(shape=(widths[0],), name="input_1")
    norm = keras.layers.Normalization(name="normalization")
    x = norm(inputs)
    for i, width in enumerate(widths[1:]):
        if i:
            x = keras.layers.ReLU(name="re_lu" + (f"_{i - 1}" if i > 1 else ""))(x)
        if dropout and i == len(widths) - 2:
            x = keras.layers.Dropout(0.25, name="dropout")(x)
        x = keras.layers.Dense(width, name="dense" + (f"_{i}" if i else ""))(x)
    out = keras.layers.Activation("sigmoid", name="classification_head_1")(x)
    model = keras.Model(inputs, out)
    norm.adapt(rng.normal(0.01, 0.03, (64, widths[0])).astype("float32"))
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dense):
            kernel, bias = layer.get_weights()
            layer.set_weights([rng.normal(0, 1.5 / np.sqrt(kernel.shape[0]), kernel.shape).astype("float32"),
                               rng.normal(0, 0.1, bias.shape).astype("float32")])
    model.compile(optimizer="adam", loss="binary_crossentropy")  # autokeras saves its optimizer too
    return model, rng


def main():
    OUT.mkdir(exist_ok=True)
    for kind, (folder, widths, dropout) in SHAPES.items():
        model, rng = build(widths, dropout, seed=len(widths))
        probe = rng.normal(0.01, 0.03, (16, widths[0])).astype("float32")
        probe /= np.linalg.norm(probe, axis=1, keepdims=True)
        expected = model.predict(probe, verbose=0)[:, 0]
        with tempfile.TemporaryDirectory() as tmp:
            model.save(os.path.join(tmp, folder))  # tf.keras 2: a SavedModel directory
            target = OUT / f"autokeras_nsfw_{kind}.zip"
            with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
                for path in sorted(Path(tmp).rglob("*")):
                    if path.is_file():
                        zf.write(path, path.relative_to(tmp).as_posix())
        np.savez(OUT / f"autokeras_nsfw_{kind}_expected.npz", probe=probe, expected=expected)
        print(target, target.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
