"""`clipfleet models import-head` for each head LAION releases, as it ships, and `models fetch
laion:KIND` over HTTP on loopback with the file's sha256 checked."""
from __future__ import annotations

import functools
import hashlib
import subprocess
import sys
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from clipfleet.shared.models.heads import Head, HeadError, build_architecture, load_head
from clipfleet.shared.models.laion_heads import import_head
from clipfleet.shared.storage import Store

REPO = Path(__file__).resolve().parents[2]
DATA = Path(__file__).parent / "data"
CLI = [sys.executable, "-m", "clipfleet.producer.cli"]


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), cwd=REPO, capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize("kind", ["nsfw-l14", "nsfw-b32"])
def test_autokeras_nsfw_zip_imports_and_scores_as_keras_did(tmp_path, kind):
    # Made by make_autokeras_heads.py with TensorFlow: LAION's layer names, shapes and format
    # (a zipped SavedModel with its optimizer), and the outputs Keras gave on probe embeddings.
    short = kind.split("-")[1]
    out = tmp_path / f"{kind}.pt"
    done = cli("models", "import-head", kind, str(DATA / f"autokeras_nsfw_{short}.zip"), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert f"--punsafe-head {kind}:{out}" in done.stdout
    expected = np.load(DATA / f"autokeras_nsfw_{short}_expected.npz")
    head = load_head(f"{kind}:{out}")
    scores = head.score_embeddings(expected["probe"])
    np.testing.assert_allclose(scores, expected["expected"], atol=1e-5)
    assert scores.min() < 0.5 < scores.max()  # the probe reaches both sides: the comparison means something


def test_an_unzipped_savedmodel_folder_imports_the_same(tmp_path):
    with zipfile.ZipFile(DATA / "autokeras_nsfw_b32.zip") as zf:
        zf.extractall(tmp_path)
    from_folder = import_head("nsfw-b32", str(tmp_path / "clip_autokeras_nsfw_b32"))
    from_zip = import_head("nsfw-b32", str(DATA / "autokeras_nsfw_b32.zip"))
    assert from_folder.keys() == from_zip.keys()
    assert all(torch.equal(from_folder[k], from_zip[k]) for k in from_zip)


def test_the_wrong_detector_or_a_broken_file_is_refused_with_why(tmp_path):
    wrong = cli("models", "import-head", "nsfw-l14", str(DATA / "autokeras_nsfw_b32.zip"), "--out", str(tmp_path / "x.pt"))
    assert wrong.returncode == 2 and "ViT-B/32 detector" in wrong.stderr and "Traceback" not in wrong.stderr
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"not a zip at all")
    broken = cli("models", "import-head", "nsfw-b32", str(junk), "--out", str(tmp_path / "y.pt"))
    assert broken.returncode == 2 and str(junk) in broken.stderr and "Traceback" not in broken.stderr
    with pytest.raises(HeadError, match="does not exist"):
        import_head("aesthetic-l14", str(tmp_path / "missing.pth"))
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "y.pt").exists()


def test_aesthetic_pth_round_trip(tmp_path):
    torch.manual_seed(1)
    original = build_architecture("aesthetic-l14").eval()
    torch.save(original.state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    out = tmp_path / "heads" / "aesthetic.pt"
    done = cli("models", "import-head", "aesthetic-l14", str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"),
               "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "--aesthetic-head aesthetic-l14:" in done.stdout
    x = torch.nn.functional.normalize(torch.randn(8, 768), dim=-1)
    with torch.no_grad():
        expected = original(x).numpy()
    np.testing.assert_allclose(load_head(f"aesthetic-l14:{out}").score_embeddings(x.numpy()), expected, atol=1e-6)


def test_watermark_pt_round_trip_from_a_data_parallel_checkpoint(tmp_path):
    from PIL import Image
    torch.manual_seed(2)
    original = build_architecture("watermark-effnet").eval()
    # Saved from nn.DataParallel: every key starts with "module.".
    torch.save({f"module.{k}": v for k, v in original.state_dict().items()}, tmp_path / "watermark_model_v1.pt")
    out = tmp_path / "watermark.pt"
    done = cli("models", "import-head", "watermark-effnet", str(tmp_path / "watermark_model_v1.pt"), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "--pwatermark-head watermark-effnet:" in done.stdout
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 255, (300, 200, 3), dtype=np.uint8)) for _ in range(2)]
    head = load_head(f"watermark-effnet:{out}", device="cpu")
    reference = Head("ref", "watermark-effnet", "image", "binary", None, original, {}, "cpu")  # scored the same way
    np.testing.assert_allclose(head.score_images(pictures), reference.score_images(pictures), atol=1e-5)


@pytest.fixture
def file_server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_fetch_laion_head_checks_its_sha256_and_lands_in_the_model_cache(tmp_path, file_server, store_uri):
    root, url = file_server
    (root / "clip_autokeras_nsfw_b32.zip").write_bytes((DATA / "autokeras_nsfw_b32.zip").read_bytes())
    digest = hashlib.sha256((root / "clip_autokeras_nsfw_b32.zip").read_bytes()).hexdigest()
    cache = f"{store_uri}/models"
    bad = cli("models", "fetch", "laion:nsfw-b32", "--to", cache, "--url", f"{url}/clip_autokeras_nsfw_b32.zip",
              "--sha256", "0" * 64)
    assert bad.returncode == 1 and "expected " + "0" * 64 in bad.stderr
    assert not Store(cache).exists("heads/nsfw-b32.pt")
    good = cli("models", "fetch", "laion:nsfw-b32", "--to", cache, "--url", f"{url}/clip_autokeras_nsfw_b32.zip",
               "--sha256", digest)
    assert good.returncode == 0, good.stderr
    spec = good.stdout.split("use it as ")[1].split()[0]
    assert spec == f"nsfw-b32:{cache}/heads/nsfw-b32.pt"
    expected = np.load(DATA / "autokeras_nsfw_b32_expected.npz")
    np.testing.assert_allclose(load_head(spec).score_embeddings(expected["probe"]), expected["expected"], atol=1e-5)
    assert Store(cache).read_json("heads/nsfw-b32.source.json")["sha256"] == digest
    # The first fetch's digest pins later ones: a changed file is refused.
    (root / "clip_autokeras_nsfw_b32.zip").write_bytes(b"changed")
    changed = cli("models", "fetch", "laion:nsfw-b32", "--to", cache, "--url", f"{url}/clip_autokeras_nsfw_b32.zip")
    assert changed.returncode == 1 and f"expected {digest}" in changed.stderr


def test_laion_files_are_fetched_over_https_only():
    done = cli("models", "fetch", "laion:aesthetic-l14", "--to", "/tmp/unused", "--url", "http://example.org/a.pth")
    assert done.returncode == 1 and "over HTTPS" in done.stderr
