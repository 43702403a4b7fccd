"""The `sandbox` and `models` subcommands, added to the main CLI by `register(subparsers)`."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `sandbox {make,serve}` and `models {list,eval}`; each sets `func(args) -> int`."""
    from clipfleet.sandbox.web import DEFAULT_PORT, DEFAULT_SAMPLES, DEFAULT_SEED, DEFAULT_WAT_FILES

    sandbox = subparsers.add_parser("sandbox", help="the local synthetic web (offline test world)")
    actions = sandbox.add_subparsers(dest="sandbox_command", required=True, metavar="{make,serve}")

    make = actions.add_parser("make", help="write images, WAT files and ground truth to DIR")
    make.add_argument("dir", help="folder to write the world into (web/, wat/, ground_truth/)")
    make.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                      help=f"number of images (default {DEFAULT_SAMPLES})")
    make.add_argument("--port", type=int, default=DEFAULT_PORT,
                      help=f"port baked into every URL (default {DEFAULT_PORT})")
    make.add_argument("--seed", type=int, default=DEFAULT_SEED,
                      help=f"random seed: the same seed makes the same world (default {DEFAULT_SEED})")
    make.add_argument("--wat-files", type=int, default=DEFAULT_WAT_FILES,
                      help=f"number of WAT files (default {DEFAULT_WAT_FILES})")
    make.add_argument("--wrong-captions", type=float, default=None, metavar="SHARE",
                      help="share of captions wrong in colour and shape (default 0.15)")
    make.add_argument("--aspect-ratios", default=None, metavar="LOW:HIGH",
                      help="draw each image's width/height from this range, e.g. 0.5:2.5 for 1:2 to 2.5:1 "
                           "(default: the web's usual few ratios, 2:3 to 16:9)")
    make.set_defaults(func=_make)

    serve = actions.add_parser("serve", help="serve DIR over HTTP on 127.0.0.1 until Ctrl-C")
    serve.add_argument("dir", help="a folder written by `clipfleet sandbox make`")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default %(default)s; the URLs in the world name 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None,
                       help="default: the port DIR was made with (its URLs use it)")
    serve.add_argument("--log-requests", action="store_true", help="log every request")
    serve.set_defaults(func=_serve)

    models = subparsers.add_parser("models", help="the CLIP models clipfleet can load")
    model_actions = models.add_subparsers(dest="models_command", required=True,
                                          metavar="{list,eval,fetch,import-head}")
    listing = model_actions.add_parser("list", help="list shipped models and how to add others")
    listing.set_defaults(func=_list_models)
    evaluate = model_actions.add_parser(
        "eval", help="zero-shot accuracy and tag-head scores on a fresh sandbox sample")
    evaluate.add_argument("--model", required=True,
                          help="'shapes', an open_clip 'ARCH/pretrained' name, or a local path")
    evaluate.add_argument("--per-class", type=int, default=10,
                          help="images per colour x shape class (default 10)")
    evaluate.add_argument("--seed", type=int, default=12345,
                          help="seed of the fresh sample, different from the training world's (default %(default)s)")
    evaluate.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default %(default)s)")
    evaluate.set_defaults(func=_evaluate)
    from clipfleet.producer.models_cli import register as register_models
    register_models(model_actions)  # fetch, import-head


def _make(args) -> int:
    from clipfleet.sandbox.images import parse_aspects
    from clipfleet.sandbox.web import WRONG_CAPTION_SHARE, make_sandbox

    try:
        aspects = parse_aspects(args.aspect_ratios) if args.aspect_ratios else None
        wrong = WRONG_CAPTION_SHARE if args.wrong_captions is None else args.wrong_captions
        settings = make_sandbox(args.dir, samples=args.samples, port=args.port, seed=args.seed,
                                wat_files=args.wat_files, wrong_caption_share=wrong, aspects=aspects)
    except ValueError as exc:
        print(f"clipfleet: error: {exc}", file=sys.stderr)
        return 2
    print(f"sandbox written to {args.dir}: {settings['samples']} images, "
          f"{len(settings['wat_files'])} WAT files, {settings['pairs']} expected pairs, "
          f"URLs on {settings['base_url']}")
    return 0


def _serve(args) -> int:
    from clipfleet.sandbox.server import SandboxServer, read_settings

    made_port = read_settings(args.dir)["port"]
    server = SandboxServer(args.dir, host=args.host, port=args.port, quiet=not args.log_requests)
    if server.port != made_port:
        print(f"warning: {args.dir} was made for port {made_port}; its URLs will not match",
              file=sys.stderr)
    from clipfleet.producer.cli import stop_requested

    stop = stop_requested()
    server.start()
    try:
        print(f"serving {args.dir} at {server.url} (Ctrl-C to stop)", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        server.stop()
    return 0


def _list_models(args) -> int:
    from clipfleet.shared.models import shipped_models

    for name, info in shipped_models().items():
        print(f"{name}\t{info}")
    print("other names: an open_clip 'ARCH/pretrained' name (e.g. ViT-B-32/openai) or "
          "'hf-hub:ORG/REPO', fetched once with `clipfleet models fetch NAME --to STORE/models`, "
          "or a local checkpoint path")
    return 0


def _evaluate(args) -> int:
    from clipfleet.sandbox.evaluate import EvaluationError, evaluate_model, print_report

    try:
        result = evaluate_model(args.model, per_class=args.per_class, seed=args.seed, device=args.device)
    except EvaluationError as exc:  # a name, a file or a device that is not there: one line, no traceback
        print(f"clipfleet: error: {exc}", file=sys.stderr)
        return 2
    print_report(result)
    return 0
