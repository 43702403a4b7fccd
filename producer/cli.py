"""The `clipfleet` command line. Each subcommand is a small function over the library."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading

from producer.fleet import FleetError, check_broker, parse_queues, start_fleet, state_dir
from producer.run import RunError
from shared.pipeline import QUEUES, STAGES
from shared.runconfig import RunConfig
from shared.storage import StoreError

log = logging.getLogger("clipfleet")


# -- up / worker -------------------------------------------------------------------------------
def cmd_up(args) -> int:
    queues = parse_queues(args.queues)
    if args.store:
        from producer.run import check_store
        check_store(args.store)
    key = args.store or "up"
    logs = state_dir(key) / "logs"
    logs.mkdir(exist_ok=True)
    fleet = start_fleet(queues, broker=args.broker, store_key=key, flower=True,
                        flower_port=args.flower_port, log_dir=logs, concurrency=args.concurrency)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        user, password = fleet.flower_auth
        print(f"broker: {fleet.broker}")
        print(f"flower: {fleet.flower_url}")
        print(f"flower login: {user} / {password}")
        print(f"workers: {', '.join(queues)} (logs in {logs})")
        print("press Ctrl-C to stop", flush=True)
        while not stop.wait(1.0):
            if fleet.dead():
                log.error("fleet process exited: %s; stopping", ", ".join(fleet.dead()))
                return 1
        return 0
    finally:
        print("stopping fleet...", flush=True)
        fleet.stop()
        print("stopped", flush=True)


def cmd_worker(args) -> int:
    from producer.fleet import worker_argv
    queues = parse_queues(args.queues)
    broker = args.broker or os.environ.get("CLIPFLEET_BROKER")
    if not broker:
        raise FleetError("no broker: pass --broker redis://HOST:PORT/0 or set CLIPFLEET_BROKER")
    check_broker(broker)
    os.environ["CLIPFLEET_BROKER"] = broker
    argv = worker_argv(queues, broker, args.concurrency)
    os.execv(argv[0], argv)  # the worker replaces us, so signals reach Celery directly


# -- run / status ------------------------------------------------------------------------------
def built_stages() -> set[str]:
    from workers.app import TASK_MODULES, app
    for module in TASK_MODULES:
        importlib.import_module(module)
    return {s for s in STAGES if f"clipfleet.{s}" in app.tasks}


def run_config_from_args(args, store_uri: str) -> RunConfig:
    if args.wat:
        from producer.sources import wat_inputs
        inputs, kind = wat_inputs(args.wat), "wat"
    elif args.crawl:
        from producer.sources import crawl_inputs
        inputs, kind = crawl_inputs(args.crawl, args.wat_count, seed=args.sample_seed), "wat"
    else:
        inputs, kind = list(args.urls), "urls"
    return RunConfig(
        store=store_uri, inputs=inputs, input_kind=kind, until=args.until, shard_size=args.shard_size,
        image_size=args.image_size, allow_private_addresses=args.allow_private_addresses,
        filter_model=args.filter_model, multilingual_filter_model=args.multilingual_filter_model,
        embed_model=args.embed_model, min_similarity_en=args.min_similarity_en,
        min_similarity_other=args.min_similarity_other, url_col=args.url_col,
        caption_col=args.caption_col, user_agent_token=args.user_agent_token,
        min_language_score=args.min_language_score, dedup_by=args.dedup_by,
        drop_extensions=tuple(e.strip().lower() for e in args.drop_extensions.split(",") if e.strip()),
        **download_options_from_args(args))


def download_options_from_args(args) -> dict:
    from workers.resize import ResizeOptions
    ResizeOptions(args.image_size, args.resize_mode, args.encode_format, args.encode_quality)  # ValueError if bad
    if args.urls:  # before run.json is written: a fixed command must not meet "a different run"
        from producer.urls import input_columns
        for uri in args.urls:
            input_columns(uri, args.url_col, args.caption_col)
    blocklist = args.blocklist
    if blocklist:
        from workers.blocklist import Blocklist
        if "://" not in blocklist:
            blocklist = os.path.abspath(blocklist)  # workers may run in another directory
        try:
            Blocklist.load(blocklist)  # a malformed or missing list fails here, not in every task
        except OSError as exc:
            raise ValueError(f"blocklist {blocklist} cannot be read: {exc}") from exc
    return dict(
        resize_mode=args.resize_mode, encode_format=args.encode_format, encode_quality=args.encode_quality,
        min_image_size=args.min_image_size, max_aspect_ratio=args.max_aspect_ratio,
        resize_only_if_bigger=args.resize_only_if_bigger, skip_reencode=args.skip_reencode,
        download_timeout=args.download_timeout, download_retries=args.download_retries,
        download_threads=args.download_threads, max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels,
        disallowed_header_directives=[d.strip().lower() for d in args.disallowed_header_directives.split(",") if d.strip()],
        domain_max_concurrency=args.domain_max_concurrency, domain_max_rate=args.domain_max_rate,
        blocklist=blocklist)


def cmd_run(args) -> int:
    from producer import run as runlib
    if args.detach and not args.broker:
        raise RunError("--detach needs --broker: an embedded broker stops when this command exits")
    if args.broker:
        check_broker(args.broker)
    store = runlib.check_store(args.store)
    cfg = run_config_from_args(args, store.uri)
    built = built_stages()
    stages = runlib.stages_of(cfg, built)
    if not stages:
        raise RunError(f"this fleet has no {cfg.input_kind} entry stage yet")
    if stages[-1] != cfg.until:
        log.warning("stages after %s are not built yet; this run stops there", stages[-1])
    runlib.register(store, cfg)
    first = runlib.first_tasks(store, cfg)
    state = runlib.progress(store, stages, first)
    if first and all(p.expected <= p.done for p in state):  # a rerun of a finished run: no fleet needed
        print(f"nothing to do: all {len(first)} {first[0].stage} tasks already done")
        print(runlib.summary(state))
        return 0
    fleet = None
    try:
        if args.broker:
            broker = args.broker
        else:
            logs = state_dir(store.uri) / "logs"
            logs.mkdir(exist_ok=True)
            log.info("starting an embedded fleet for %s (logs in %s)", ", ".join(stages), logs)
            fleet = start_fleet([QUEUES[s] for s in stages], store_key=store.uri, flower=False,
                                log_dir=logs)
            broker = fleet.broker
        from workers.app import make_app
        import redis
        app, client = make_app(broker), redis.Redis.from_url(broker)
        if args.detach:
            sent = runlib.enqueue(app, client, store, first)
            print(f"enqueued {sent} {first[0].stage if first else ''} tasks; "
                  f"follow with: clipfleet status --store {store.uri}")
            return 0
        sent = []  # the feeder's count, so a resumed run can say it sent nothing new
        feeder = threading.Thread(target=lambda: sent.append(runlib.enqueue(app, client, store, first)),
                                  daemon=True)
        feeder.start()
        state = runlib.follow(store, stages, first, fleet=fleet)
        feeder.join(timeout=10)
        if sent:
            print(f"sent {sent[0]} of {len(first)} {first[0].stage if first else ''} tasks "
                  f"({len(first) - sent[0]} already done)")
        print(runlib.summary(state))
        failed = [p for p in state if p.failed]
        if failed:
            for p in failed:
                for d in store.deadletters(p.stage):
                    print(f"  dead letter {p.stage} {d['shard']}: {d.get('error')}", file=sys.stderr)
            return 1
        return 0
    finally:
        if fleet is not None:
            fleet.stop()


def cmd_status(args) -> int:
    from producer.status import run_status
    return run_status(args.store, as_json=args.json)


def cmd_demo(args) -> int:
    from producer.demo import run_demo
    return run_demo(args.store, args.samples, args.keep_serving)


# -- parser ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    d = RunConfig(store="")
    p = argparse.ArgumentParser(prog="clipfleet", description=(
        "Turn Common Crawl into a curated, searchable image-text dataset with a Celery fleet."))
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="start a fleet on this machine: Redis, one worker per queue, Flower")
    up.add_argument("--store", help="store URI the fleet will write to; checked for writes at start")
    up.add_argument("--broker", help="Redis URL of an existing broker (default: start an embedded one)")
    up.add_argument("--queues", default="all", help=f"all, or a comma list of: {', '.join(QUEUES.values())}")
    up.add_argument("--flower-port", type=int, help="port for Flower (default: a free one)")
    up.add_argument("--concurrency", type=int, help="processes per worker (default: cores for CPU queues, 1 for model queues)")
    up.set_defaults(func=cmd_up)

    wk = sub.add_parser("worker", help="start one worker for a fleet node")
    wk.add_argument("--queues", required=True, help=f"comma list of: {', '.join(QUEUES.values())}")
    wk.add_argument("--concurrency", type=int, help="processes (default: cores for CPU queues, 1 for model queues)")
    wk.add_argument("--broker", help="Redis URL (default: $CLIPFLEET_BROKER)")
    wk.set_defaults(func=cmd_worker)

    rn = sub.add_parser("run", help="run the pipeline on WAT files, a crawl, or URL parquet files")
    src = rn.add_mutually_exclusive_group(required=True)
    src.add_argument("--wat", nargs="+", metavar="FILE_OR_URL", help="WAT files: local paths, https:// or s3:// URIs")
    src.add_argument("--crawl", metavar="CC-MAIN-YYYY-WW", help="a Common Crawl crawl id; takes --wat-count segments of it")
    src.add_argument("--urls", nargs="+", metavar="PARQUET", help="parquet files with url and caption columns; starts at download")
    rn.add_argument("--wat-count", type=int, default=1, help="with --crawl: how many WAT segments (default 1)")
    rn.add_argument("--sample-seed", type=int, default=None, help="with --crawl: take a seeded random sample of segments instead of the first N")
    rn.add_argument("--store", required=True, help="where the run writes: a directory or s3://bucket/prefix")
    rn.add_argument("--broker", help="Redis URL of a running fleet (default: start an embedded fleet for this run)")
    rn.add_argument("--detach", action="store_true", help="enqueue and exit (needs --broker); follow with `clipfleet status`")
    rn.add_argument("--until", choices=STAGES, default="index", help="stop after this stage (default: index)")
    rn.add_argument("--filter-model", default=d.filter_model, help="CLIP model for English pairs (default %(default)s)")
    rn.add_argument("--multilingual-filter-model", default=d.multilingual_filter_model, help="CLIP model for other/no-language pairs (default %(default)s)")
    rn.add_argument("--embed-model", default=d.embed_model, help="model for the embeddings (default %(default)s)")
    rn.add_argument("--min-similarity-en", type=float, default=d.min_similarity_en, help="keep English pairs at or above this cosine (default %(default)s)")
    rn.add_argument("--min-similarity-other", type=float, default=d.min_similarity_other, help="keep other pairs at or above this cosine (default %(default)s)")
    rn.add_argument("--image-size", type=int, default=d.image_size, help="resize images to this many pixels (default %(default)s)")
    rn.add_argument("--shard-size", type=int, default=d.shard_size, help="samples per shard (default %(default)s)")
    rn.add_argument("--min-language-score", type=float, default=d.min_language_score,
                    help="with --wat/--crawl: a caption whose language scores under this gets language \"\" (default %(default)s)")
    rn.add_argument("--drop-extensions", default=",".join(d.drop_extensions),
                    help="with --wat/--crawl: drop image URLs whose path ends in these, comma list (default %(default)s)")
    rn.add_argument("--dedup-by", choices=["url", "uid"], default=d.dedup_by,
                    help="with --wat/--crawl: keep each URL once (url), or each URL+caption once (uid) (default %(default)s)")
    rn.add_argument("--url-col", default=d.url_col, help="with --urls: the URL column (default %(default)s)")
    rn.add_argument("--caption-col", default=d.caption_col, help="with --urls: the caption column (default %(default)s)")
    rn.add_argument("--user-agent-token", default=d.user_agent_token, help="added to the downloader's user agent so site owners can reach you")
    rn.add_argument("--allow-private-addresses", action="store_true",
                    help="let the downloader fetch loopback and private addresses (off by default; for local tests); "
                         "link-local, multicast and reserved addresses stay refused")
    dl = rn.add_argument_group("download (img2dataset's option names)")
    dl.add_argument("--resize-mode", choices=["no", "keep_ratio", "center_crop", "border", "keep_ratio_largest"],
                    default=d.resize_mode, help="default %(default)s")
    dl.add_argument("--encode-format", choices=["jpg", "png", "webp"], default=d.encode_format, help="default %(default)s")
    dl.add_argument("--encode-quality", type=int, default=d.encode_quality, help="jpg/webp quality, png compression (default %(default)s)")
    dl.add_argument("--min-image-size", type=int, default=d.min_image_size, help="drop images whose smaller side is under this (default %(default)s)")
    dl.add_argument("--max-aspect-ratio", type=float, default=d.max_aspect_ratio, help="drop images longer than this ratio (default %(default)s)")
    dl.add_argument("--resize-only-if-bigger", action="store_true",
                    help="leave an image that already fits as it is: no enlarging, padding or cropping")
    dl.add_argument("--skip-reencode", action="store_true",
                    help="store the downloaded bytes of an image that is not resized and already in --encode-format "
                         "(still decoded once, as a check)")
    dl.add_argument("--download-timeout", type=float, default=d.download_timeout, help="seconds of network time per image, all redirects and retries (default %(default)s)")
    dl.add_argument("--download-retries", type=int, default=d.download_retries, help="extra attempts for transient failures: 5xx, 429, resets (default %(default)s)")
    dl.add_argument("--download-threads", type=int, default=d.download_threads, help="fetching threads per download process (default %(default)s)")
    dl.add_argument("--max-image-bytes", type=int, default=d.max_image_bytes, help="per image as downloaded (default %(default)s)")
    dl.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels, help="checked on the header before decoding (default %(default)s)")
    dl.add_argument("--disallowed-header-directives", default=",".join(d.disallowed_header_directives),
                    help="X-Robots-Tag directives that mean an image is not used, comma list, empty for none (default %(default)s)")
    dl.add_argument("--domain-max-concurrency", type=int, default=d.domain_max_concurrency, help="requests in flight per host across the fleet, 0 for no limit (default %(default)s)")
    dl.add_argument("--domain-max-rate", type=float, default=d.domain_max_rate, help="requests per second per host across the fleet, 0 for no limit (default %(default)s)")
    dl.add_argument("--blocklist", help="file or URI of URLs and md5/sha256 digests (one a line) never stored")
    rn.set_defaults(func=cmd_run)

    st = sub.add_parser("status", help="what a run has done: shards per stage, counts, failures")
    st.add_argument("--store", required=True, help="the run's store")
    st.add_argument("--json", action="store_true", help="print JSON instead of a table")
    st.set_defaults(func=cmd_status)

    dm = sub.add_parser("demo", help="run the whole pipeline offline on a local synthetic web")
    dm.add_argument("--store", default="demo-store", help="where the demo run writes (default %(default)s); the sandbox world goes beside it")
    dm.add_argument("--samples", type=int, default=1000, help="images in the synthetic web (default %(default)s)")
    dm.add_argument("--keep-serving", action="store_true", help="keep serving the synthetic web after the run, until Ctrl-C")
    dm.set_defaults(func=cmd_demo)

    try:
        from sandbox.cli import register as register_sandbox
    except ImportError:
        pass
    else:
        register_sandbox(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args) or 0
    except (FleetError, StoreError, RunError, ValueError) as exc:
        print(f"clipfleet: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clipfleet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
