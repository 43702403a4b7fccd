"""A model hub on 127.0.0.1 that speaks the Hugging Face hub's file protocol.

HEAD and GET /{org}/{repo}/resolve/{revision}/{file} answer with X-Repo-Commit, ETag and
Content-Length as the hub does (huggingface_hub's file_download reads exactly these), GET
honours Range (resumed downloads), and an unknown repo or file is a 404 with the hub's
X-Error-Code. `GET /api/models/{org}/{repo}[/revision/{rev}]` and `.../tree/{rev}` list a
repo's files for snapshot_download. Every request is counted, so a test can say how often a file was fetched.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class Hub:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.requests: Counter = Counter()  # (method, "org/repo/file") -> count
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # -- repos ---------------------------------------------------------------
    def add_file(self, repo: str, filename: str, source: Path | bytes) -> Path:
        target = self.root / repo / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, bytes):
            target.write_bytes(source)
        else:
            shutil.copyfile(source, target)
        return target

    def commit(self, repo: str) -> str:
        return hashlib.sha1(repo.encode()).hexdigest()  # 40 hex digits, as a git commit

    def gets(self, repo: str, filename: str) -> int:
        return self.requests[("GET", f"{repo}/{filename}")]

    # -- server --------------------------------------------------------------
    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._answer(body=False)

            def do_GET(self):
                self._answer(body=True)

            def _answer(self, body: bool):
                path = self.path.split("?", 1)[0]
                # Repos are ORG/NAME, or a bare NAME as the hub's oldest ones (xlm-roberta-base).
                tree = re.fullmatch(r"/api/models/([^/]+(?:/[^/]+)?)/tree/[^/]+(?:/(.+))?", path)
                if tree:
                    return self._tree(tree.group(1), tree.group(2) or "")
                api = re.fullmatch(r"/api/models/([^/]+(?:/[^/]+)?)(?:/revision/[^/]+)?", path)
                if api:
                    return self._listing(api.group(1))
                match = re.fullmatch(r"/([^/]+(?:/[^/]+)?)/resolve/([^/]+)/(.+)", path)
                if not match:
                    return self._error(404, "RepoNotFound")
                repo, _, filename = match.groups()
                hub.requests[(self.command, f"{repo}/{filename}")] += 1
                if not (hub.root / repo).is_dir():
                    return self._error(404, "RepoNotFound")
                target = hub.root / repo / filename
                if not target.is_file():
                    return self._error(404, "EntryNotFound")
                data = target.read_bytes()
                start = 0
                ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if ranged and body:
                    start = int(ranged.group(1))
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", hub.commit(repo))
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if body:
                    self.wfile.write(data[start:])

            def _listing(self, repo: str):
                folder = hub.root / repo
                if not folder.is_dir():
                    return self._error(404, "RepoNotFound")
                files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
                self._json({"id": repo, "sha": hub.commit(repo), "siblings": [{"rfilename": f} for f in files]})

            def _tree(self, repo: str, sub: str):
                """The repo's files (under `sub`), as the hub's tree API lists them (snapshot_download
                reads it; transformers asks for a folder of chat templates that is seldom there)."""
                top = hub.root / repo
                if not top.is_dir():
                    return self._error(404, "RepoNotFound")
                folder = top / sub
                if not folder.is_dir():
                    return self._error(404, "EntryNotFound")
                entries = [{"type": "file", "path": p.relative_to(top).as_posix(), "size": p.stat().st_size,
                            "oid": hashlib.sha1(p.read_bytes()).hexdigest()}
                           for p in sorted(folder.rglob("*")) if p.is_file()]
                self._json(entries)

            def _json(self, obj):
                payload = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(payload)

            def _error(self, status: int, code: str):
                payload = json.dumps({"error": code}).encode()
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(payload)

        return Handler


def shapes_repo_files(out: Path) -> dict[str, Path]:
    """The shipped `shapes` model as an open_clip hub repo: open_clip_config.json and
    open_clip_model.safetensors (the same fp16 weights)."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from clipfleet.shared.models import CONFIG_FILE, SHAPES_DIR, WEIGHTS_FILE
    out.mkdir(parents=True, exist_ok=True)
    with np.load(SHAPES_DIR / WEIGHTS_FILE) as packed:
        state = {key: torch.from_numpy(packed[key].copy()) for key in packed.files}
    save_file(state, str(out / "open_clip_model.safetensors"))
    shutil.copyfile(SHAPES_DIR / CONFIG_FILE, out / CONFIG_FILE)
    return {CONFIG_FILE: out / CONFIG_FILE, "open_clip_model.safetensors": out / "open_clip_model.safetensors"}


def vit_b32_weights(out: Path) -> Path:
    """A ViT-B-32 state dict in fp16 safetensors, laid out as open_clip's ViT-B-32/openai hub
    file. Its values are random (no CLIP weights reach this machine): the test checks how the
    file travels and that the filter runs with it, not what it judges."""
    import open_clip
    import torch
    from safetensors.torch import save_file
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True)
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    target = out / "open_clip_model.safetensors"
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(target))
    return target


def xlmr_tower_repo(out: Path) -> dict[str, Path]:
    """A stand-in for the hub's `xlm-roberta-base` repo (the text tower of LAION's multilingual
    filter): an XLM-R config, small (1 layer, 64 wide, 256 tokens) so the test stays fast, and
    a tokenizer.json transformers loads as it loads the real one. open_clip builds the tower from
    this config, so the checkpoint made by `xlmr_clip_weights` fits it."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, XLMRobertaConfig
    out.mkdir(parents=True, exist_ok=True)
    XLMRobertaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=514, type_vocab_size=1).save_pretrained(out)
    words = ["<s>", "<pad>", "</s>", "<unk>"] + [chr(c) for c in range(0x20, 0x250)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(dict.fromkeys(words))}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>", cls_token="<s>", sep_token="</s>",
                            model_max_length=512).save_pretrained(out)
    return {p.name: p for p in out.iterdir() if p.is_file()}


XLMR_ARCH = "xlm-roberta-base-ViT-B-32"


def xlmr_clip_weights(out: Path, hub_url: str, hf_home: Path) -> Path:
    """A checkpoint of open_clip's xlm-roberta-base-ViT-B-32 (random values, fp16 safetensors),
    built in a process that reads the text tower's config from the hub at `hub_url`."""
    import os
    import subprocess
    import sys
    out.mkdir(parents=True, exist_ok=True)
    target = out / "open_clip_model.safetensors"
    code = ("import sys, torch, open_clip; from safetensors.torch import save_file; torch.manual_seed(0); "
            f"m = open_clip.create_model({XLMR_ARCH!r}, pretrained=None, pretrained_hf=False); "
            "save_file({k: v.detach().half().contiguous() for k, v in m.state_dict().items()}, sys.argv[1])")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub_url, HF_HOME=str(hf_home))
    subprocess.run([sys.executable, "-c", code, str(target)], env=env, check=True, timeout=300,
                   capture_output=True)
    return target
