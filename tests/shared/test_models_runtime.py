"""Model loading as the CLIP stages use it: calibrated thresholds, HF text towers that are not
cached, devices and the split of cores between the model and decoding."""
from __future__ import annotations

import pytest

from clipfleet.shared.models import ModelNotAvailable, load_clip, suggested_min_similarity
from clipfleet.shared.models import runtime
from clipfleet.workers.clip.options import ClipOptions


def test_shapes_ships_its_threshold_and_open_clip_names_fall_back_to_laions():
    assert suggested_min_similarity("shapes") == 0.7
    assert suggested_min_similarity("ViT-B-32/openai") is None
    opts = ClipOptions(filter_model="shapes")
    assert (opts.min_similarity_en, opts.min_similarity_other) == (0.7, 0.26)
    assert ClipOptions(min_similarity_en=0.3).min_similarity_en == 0.3  # an explicit value wins


def test_a_text_tower_missing_from_the_hugging_face_cache_names_the_model(tmp_path):
    checkpoint = tmp_path / "xlm.pt"
    checkpoint.write_bytes(b"")  # never read: building the tower fails first, offline
    name = f"xlm-roberta-base-ViT-B-32/{checkpoint}"
    with pytest.raises(ModelNotAvailable, match="xlm-roberta-base-ViT-B-32") as info:
        load_clip(name)
    assert "Hugging Face text tower" in str(info.value)


def test_the_model_gets_every_core_and_decoding_a_thread_per_eight_beside_it(monkeypatch):
    monkeypatch.setattr(runtime, "available_cores", lambda: 8)
    assert runtime.split_threads("cpu") == (8, 1)
    assert runtime.split_threads("cpu", 4) == (4, 4)
    assert runtime.split_threads("cuda") == (1, 7)
    monkeypatch.setattr(runtime, "available_cores", lambda: 16)
    assert runtime.split_threads("cpu") == (16, 2)
    monkeypatch.setattr(runtime, "available_cores", lambda: 2)
    assert runtime.split_threads("cpu") == (2, 1)


def test_devices_and_precisions_are_checked():
    with pytest.raises(ValueError, match="device must be one of"):
        runtime.choose_device("tpu")
    if not __import__("torch").cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            runtime.choose_device("cuda")
    assert runtime.choose_device("cpu") == "cpu"


@pytest.mark.parametrize("name", ["shapes", "ViT-B-32"])
def test_texts_skip_the_padding_and_give_the_same_embeddings_in_the_batch_s_order(name, monkeypatch):
    import open_clip
    import torch
    if name == "shapes":
        model = runtime.Encoder("shapes", "cpu", "fp32", 1).model
    else:  # open_clip's own CLIP class at B/32 size, random weights (nothing is downloaded)
        torch.manual_seed(0)
        model = open_clip.create_model(name, pretrained=None).eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    captions = ["a small blue square on a green background beside a yellow star", "a red circle", "",
                "a photo of a purple heart on a dotted background"]
    tokens = tokenizer(captions)
    if tokens.shape[1] < model.positional_embedding.shape[0]:  # shapes' context is 128 wide
        tokens = torch.nn.functional.pad(tokens, (0, model.positional_embedding.shape[0] - tokens.shape[1]))
    ends = (tokens.argmax(dim=-1) + 1).tolist()  # each caption's end-of-text token, plus one
    seen, mlp_rows = [], []
    hook = model.transformer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[:2]))
    mlp_hook = model.transformer.resblocks[0].mlp.register_forward_pre_hook(
        lambda _m, args: mlp_rows.append(args[0].shape[0]))
    assert runtime._packable(model)
    with torch.no_grad():
        whole = runtime.encode_texts(model, tokens)
        packed = runtime.encode_texts(model, tokens, chunk=2)
        packed_rows = mlp_rows[-1]
        monkeypatch.setattr(runtime, "_packable", lambda _model: False)  # a tower it cannot pack
        by_length = runtime.encode_texts(model, tokens, chunk=2)
        hook.remove()
        mlp_hook.remove()
        full = model.encode_text(tokens)
    # cut at the longest caption; packed: the tokens up to each caption's end and no others;
    # cut per chunk: two calls of two captions each, shortest first
    assert [tuple(s) for s in seen] == [(4, max(ends)), (2, sorted(ends)[1]), (2, max(ends))]
    assert packed_rows == sum(ends)
    assert max(ends) < 20
    assert torch.allclose(whole, full, atol=1e-5)
    assert torch.allclose(packed, full, atol=1e-5)
    assert torch.allclose(by_length, full, atol=1e-5)


def test_a_cpu_encoder_s_large_activations_are_reused_not_faulted_in_again():
    """A batch's activations (tens of MB) come back from the heap the next time, instead of
    a fresh mapping whose every page faults on first touch."""
    import resource

    import torch
    assert runtime.keep_large_blocks_in_heap()  # glibc here
    size = 64 << 20  # over glibc's largest default mmap threshold (32 MiB)
    torch.ones(size // 4).sum()  # allocate, touch, free
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(size // 4).sum()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < (size >> 12) // 10, f"{faults} page faults for a reused {size >> 20} MiB block"
