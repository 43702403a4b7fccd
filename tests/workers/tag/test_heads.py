"""Heads in LAION's architectures load state dicts of exactly their layer shapes, score as the
module they came from, and refuse anything else with the keys that differ."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clipfleet.shared.models.heads import HeadError, build_architecture, load_head, parse_spec

EMBEDDING_ARCHS = {"nsfw-l14": 768, "nsfw-b32": 512, "aesthetic-l14": 768}


def saved(tmp_path, arch, seed=0):
    torch.manual_seed(seed)
    module = build_architecture(arch).eval()
    path = tmp_path / f"{arch}.pth"
    torch.save(module.state_dict(), path)
    return module, path


def unit_rows(n, dim, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("arch", sorted(EMBEDDING_ARCHS))
def test_an_embedding_head_loads_its_state_dict_and_scores_as_its_module(tmp_path, arch):
    module, path = saved(tmp_path, arch)
    head = load_head(f"{arch}:{path}")
    assert head.dim == EMBEDDING_ARCHS[arch] and head.input == "image_embedding"
    x = unit_rows(6, head.dim)
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    assert np.allclose(head.score_embeddings(x), expected, atol=1e-6)
    if arch.startswith("nsfw"):
        assert head.kind == "binary" and ((0 <= expected) & (expected <= 1)).all()
    else:
        assert head.kind == "graded"


def test_the_aesthetic_head_has_improved_aesthetic_predictors_keys():
    keys = {k: tuple(v.shape) for k, v in build_architecture("aesthetic-l14").state_dict().items()}
    assert keys == {"layers.0.weight": (1024, 768), "layers.0.bias": (1024,),
                    "layers.2.weight": (128, 1024), "layers.2.bias": (128,),
                    "layers.4.weight": (64, 128), "layers.4.bias": (64,),
                    "layers.6.weight": (16, 64), "layers.6.bias": (16,),
                    "layers.7.weight": (1, 16), "layers.7.bias": (1,)}


def test_the_nsfw_heads_have_laions_layer_widths():
    def widths(arch):
        state = build_architecture(arch).state_dict()
        return [tuple(v.shape) for k, v in state.items() if k.endswith("weight")]
    assert widths("nsfw-l14") == [(64, 768), (512, 64), (256, 512), (1, 256)]
    assert widths("nsfw-b32") == [(32, 512), (32, 32), (1, 32)]
    assert set(build_architecture("nsfw-l14").state_dict()) >= {"mean", "variance"}


def test_a_state_dict_of_another_architecture_is_refused_clearly(tmp_path):
    _, b32 = saved(tmp_path, "nsfw-b32")
    with pytest.raises(HeadError, match=r"not a nsfw-l14 state dict \(wrong shapes: .*layers.0.weight is \(32, 512\), expected \(64, 768\)"):
        load_head(f"nsfw-l14:{b32}")
    _, aesthetic = saved(tmp_path, "aesthetic-l14")
    with pytest.raises(HeadError, match="missing keys: mean"):
        load_head(f"nsfw-l14:{aesthetic}")
    state = build_architecture("aesthetic-l14").state_dict()
    state["layers.8.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(HeadError, match="unexpected keys: layers.8.weight"):
        load_head(f"aesthetic-l14:{tmp_path / 'extra.pth'}")


def test_files_that_are_not_state_dicts_are_refused(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(HeadError, match="not a PyTorch state dict"):
        load_head(f"nsfw-b32:{tmp_path / 'junk.pth'}")
    with pytest.raises(HeadError, match="does not exist"):
        load_head(f"nsfw-b32:{tmp_path / 'missing.pth'}")
    _, path = saved(tmp_path, "nsfw-b32")
    with pytest.raises(HeadError, match="not a head written by clipfleet train-head"):
        load_head(f"mlp:{path}")
    with pytest.raises(HeadError, match="ARCH:FILE"):
        parse_spec("resnet:/x.pt")


def test_the_watermark_model_is_laions_efficientnet_and_scores_images(tmp_path):
    from PIL import Image
    module, path = saved(tmp_path, "watermark-effnet")
    classifier = [tuple(p.shape) for p in module.classifier.parameters()]
    assert classifier == [(625, 1536), (625,), (256, 625), (256,), (2, 256), (2,)]
    head = load_head(f"watermark-effnet:{path}", device="cpu")
    assert head.input == "image"
    pictures = [Image.new("RGB", (300, 200), (200, 30, 30)), Image.new("RGB", (90, 120), (20, 30, 200))]
    scores = head.score_images(pictures)
    from torchvision import transforms
    prep = transforms.Compose([transforms.Resize((256, 256)), transforms.ToTensor(),
                               transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    with torch.no_grad():
        expected = torch.softmax(module(torch.stack([prep(p) for p in pictures])), dim=1)[:, 0].numpy()
    assert np.allclose(scores, expected, atol=1e-5)
    _, b32 = saved(tmp_path, "nsfw-b32")
    with pytest.raises(HeadError, match="not a watermark-effnet state dict"):
        load_head(f"watermark-effnet:{b32}")


def test_a_head_file_on_s3_loads_for_every_worker_alike(tmp_path, s3_server):
    from clipfleet.shared.storage import Store
    from tests.conftest import make_bucket
    module, path = saved(tmp_path, "nsfw-b32")
    uri = f"s3://{make_bucket(s3_server)}/heads"
    Store(uri).write_bytes("b32.pth", path.read_bytes())
    head = load_head(f"nsfw-b32:{uri}/b32.pth")
    x = unit_rows(4, 512)
    with torch.no_grad():
        assert np.allclose(head.score_embeddings(x), module(torch.from_numpy(x)).numpy(), atol=1e-6)
    with pytest.raises(HeadError, match="does not exist"):
        load_head(f"nsfw-b32:{uri}/missing.pth")
