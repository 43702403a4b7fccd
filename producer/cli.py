"""The `clipfleet` command line. Each subcommand is a small function over the library."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from clipfleet.producer.argparsing import Parser, parse_args
from clipfleet.producer.fleet import FleetError, check_broker, parse_queues, start_fleet, state_dir
from clipfleet.producer.register import RunError
from clipfleet.shared import layout
from clipfleet.shared.options import add_flags, from_args
from clipfleet.shared.runconfig import RunConfig, sections, titles
from clipfleet.shared.stages import REGISTRY
from clipfleet.shared.storage import StoreError, shard_name
from clipfleet.workers.registry import REGISTRY as _FILLED  # noqa: F401  (the stages, before any flag)

log = logging.getLogger("clipfleet")


# -- up / worker -------------------------------------------------------------------------------
def stop_requested() -> threading.Event:
    """An event set by Ctrl-C or SIGTERM. Installed before a long-running command says it is ready,
    so a signal sent the moment it does is a clean stop, not a KeyboardInterrupt raised outside the
    command's own try/finally (seen under load as exit 130 from `sandbox serve`)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def cmd_up(args) -> int:
    queues = parse_queues(args.queues)
    if args.store:
        from clipfleet.producer.register import check_store
        check_store(args.store)
    from clipfleet.producer.model_check import check_queue_models
    check_queue_models(queues, args.store)  # where each model of these queues stands
    logs = state_dir(args.store) / "logs"
    logs.mkdir(exist_ok=True)
    fleet = start_fleet(queues, broker=args.broker, store_key=args.store, flower=True,
                        flower_port=args.flower_port, log_dir=logs, concurrency=args.concurrency)
    stop = stop_requested()
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
    from clipfleet.producer.fleet import worker_argv, worker_env
    queues = parse_queues(args.queues)
    broker = args.broker or os.environ.get("CLIPFLEET_BROKER")
    if not broker:
        raise FleetError("no broker: pass --broker redis://HOST:PORT/0 or set CLIPFLEET_BROKER")
    check_broker(broker)
    from clipfleet.producer.model_check import check_queue_models
    check_queue_models(queues)  # where each model of these queues stands (the defaults: runs name theirs per task)
    os.environ.update(worker_env(broker))
    argv = worker_argv(queues, broker, args.concurrency)
    os.execv(argv[0], argv)  # the worker replaces us, so signals reach Celery directly


# -- run / status ------------------------------------------------------------------------------
def run_config_from_args(args, store_uri: str) -> RunConfig:
    if args.wat:
        from clipfleet.producer.sources import wat_inputs
        inputs, kind = wat_inputs(args.wat), "wat"
    elif args.crawl:
        from clipfleet.producer.sources import crawl_inputs
        inputs, kind = crawl_inputs(args.crawl, args.wat_count, seed=args.sample_seed), "wat"
    else:
        inputs, kind = list(args.urls), "urls"
    given = {name: from_args(cls, args) for name, cls in sections().items()}
    if given["download"].blocklist:
        given["download"].blocklist = checked_blocklist(given["download"].blocklist)
    if given["download"].decontaminate:
        given["download"].decontaminate = checked_evaluation_set(given["download"].decontaminate)
    if kind == "urls":  # before run.json is written: a fixed command must not meet "a different run"
        from clipfleet.producer.urls import input_columns
        for uri in inputs:
            input_columns(uri, given["input"].url_col, given["input"].caption_col)
    return RunConfig(store=store_uri, inputs=inputs, input_kind=kind, until=args.until or "", sections=given)


def checked_evaluation_set(path: str) -> str:
    """--decontaminate: an absolute path (workers may run in another directory) to a folder or a
    parquet with a `phash` column, checked here rather than failing every download task."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return path
    try:
        import pyarrow.parquet as pq
        names = pq.read_schema(path).names
    except (OSError, ValueError) as exc:
        raise ValueError(f"--decontaminate {path}: neither a folder of images nor a parquet ({exc})") from exc
    if "phash" not in names:
        raise ValueError(f"--decontaminate {path}: the parquet has no phash column (it has {', '.join(names)})")
    return path


def checked_blocklist(blocklist: str) -> str:
    from clipfleet.workers.download.blocklist import Blocklist
    if "://" not in blocklist:
        blocklist = os.path.abspath(blocklist)  # workers may run in another directory
    try:
        Blocklist.load(blocklist)  # a malformed or missing list fails here, not in every task
    except OSError as exc:
        raise ValueError(f"blocklist {blocklist} cannot be read: {exc}") from exc
    return blocklist


def cmd_run(args) -> int:
    from concurrent.futures import ThreadPoolExecutor
    from clipfleet.producer import follow, register
    from clipfleet.shared.runstate import RunState
    if args.detach and not args.broker:
        raise RunError("--detach needs --broker: an embedded broker stops when this command exits")
    if args.broker:
        check_broker(args.broker)
    store = register.check_store(args.store)
    cfg = run_config_from_args(args, store.uri)
    stages = cfg.stages
    starting = None  # the embedded fleet, once started

    def start():
        logs = state_dir(store.uri) / "logs"
        logs.mkdir(exist_ok=True)
        log.info("starting an embedded fleet for %s (logs in %s)", ", ".join(stages), logs)
        # Not waited for: the first tasks wait in their queues while the workers come up (~1 s).
        return ThreadPoolExecutor(1, thread_name_prefix="fleet-start").submit(
            start_fleet, [REGISTRY[s].queue for s in stages], store_key=store.uri, flower=False, log_dir=logs,
            wait_for_workers=False)

    if not args.broker and not store.exists(layout.RUN_FILE):
        # A new run always has work: its fleet comes up while the preflight, run.json and the URL
        # shards are written instead of after them. A rerun may have none, so it starts after the check.
        starting = start()
    settled = False
    try:
        from clipfleet.producer.preflight import preflight, preflight_heads
        offline = args.offline or None
        preflight_heads(cfg, stages, offline=offline)  # laion:KIND heads into the model cache
        if "tag" in stages:  # a head that cannot tag this run's embeddings fails here, before run.json
            from clipfleet.workers.tag.plan import prepare
            prepare(cfg)
        preflight(cfg, stages, offline=offline)  # every model in the model cache before any task
        register.register(store, cfg)
        first = register.first_tasks(store, cfg)
        if not first:
            print(f"clipfleet: the input is empty: {', '.join(cfg.inputs)} holds no rows", file=sys.stderr)
            return 1
        replayed = register.replay_deadletters(store, stages)
        for stage, shard in replayed:
            print(f"replaying dead-lettered {stage} shard {shard}")
        run = RunState(store, cfg, first={shard_name(t.shard) for t in first})
        states = run.all()
        if all(s.n_done >= s.n_expected for s in states):  # a rerun of a finished run: no work for the fleet
            print(f"nothing to do: all {len(first)} {first[0].stage} tasks already done")
            lines, problems = follow.produced(store, states)
            print(follow.summary(states))
            print("\n".join(lines))
            settled = True
            return 1 if problems else 0
        if not args.broker and starting is None:
            starting = start()
        fleet = starting.result() if starting is not None else None
        broker = fleet.broker if fleet is not None else args.broker
        code = follow.run_with_fleet(run, first, broker, fleet=fleet, detach=args.detach, replayed=bool(replayed))
        settled = True  # followed to the end: every shard done or dead-lettered, nothing in flight
        return code
    finally:
        _stop_started(starting, settled)


def _stop_started(starting, settled: bool) -> None:
    """Stop the embedded fleet, at once when the run is settled and its broker holds nothing."""
    if starting is None:
        return
    try:
        fleet = starting.result()
    except Exception:
        return  # it did not start; start_fleet stopped what it had started
    if settled:
        fleet.stop_idle()
    else:
        fleet.stop()


def cmd_retry_failed(args) -> int:
    from clipfleet.producer.retry_failed import run_retry_failed
    return run_retry_failed(args.store, broker=args.broker)


def cmd_status(args) -> int:
    from clipfleet.producer.status import run_status
    return run_status(args.store, as_json=args.json, broker=args.broker, recover=not args.no_recover,
                      rebuild=args.rebuild)


def cmd_takedown(args) -> int:
    from clipfleet.producer.takedown import run_takedown
    return run_takedown(args.store, args.urls, args.hashes, args.reason, args.phashes)


def cmd_demo(args) -> int:
    from clipfleet.producer.demo import run_demo
    return run_demo(args.store, args.samples, args.serve, args.port)


def cmd_metrics(args) -> int:
    from clipfleet.producer.metrics import serve
    broker = args.broker or os.environ.get("CLIPFLEET_BROKER")
    if not broker:
        raise FleetError("no broker: pass --broker redis://HOST:PORT/0 or set CLIPFLEET_BROKER")
    stop = stop_requested()
    serve(broker, args.host, args.port, args.interval, stop)
    return 0


# -- serve / subset ----------------------------------------------------------------------------
def cmd_serve(args) -> int:
    from clipfleet.search.server import serve
    from clipfleet.search.settings import ServeSettings
    return serve(args.store, from_args(ServeSettings, args))


def cmd_subset(args) -> int:
    import json
    from clipfleet.search.subset import run_subset
    done = run_subset(args.store, args.query, args.k, args.out, max_punsafe=args.max_punsafe,
                      max_pwatermark=args.max_pwatermark, min_aesthetic=args.min_aesthetic,
                      deduplicate=args.deduplicate, languages=args.language, modality=args.modality,
                      cache_dir=args.cache_dir)
    print(f"wrote {done['rows']} of {done['asked']} samples to {args.out} ({done['searched']} searched)")
    for name, why in done["notes"].items():
        print(f"  {name}: {why}")
    print(f"download them with: img2dataset --url_list {args.out} --input_format parquet "
          f"--url_col url --caption_col caption --output_folder OUT")
    return 0 if done["rows"] else 1


# -- report / plan -----------------------------------------------------------------------------
def cmd_report(args) -> int:
    from clipfleet.producer.report import write_report
    done = write_report(args.store, args.out, max_shards=args.max_shards, grid=args.grid)
    print(f"wrote {done['out']} ({done['bytes'] / 2**20:.1f} MiB, self-contained: open it in any browser)")
    return 0


def cmd_card(args) -> int:
    from clipfleet.workers.publish.card import write_card
    card = write_card(args.store)
    if not card:
        print(f"clipfleet: {args.store} has published nothing yet (no tag shard done): no card", file=sys.stderr)
        return 1
    print(f"dataset card: {card}")
    return 0


def cmd_refilter(args) -> int:
    from clipfleet.workers.publish.refilter import run_refilter
    return run_refilter(args.store, args.keep_top_percent, args.keep_near, args.clusters)


def cmd_plan(args) -> int:
    from clipfleet.producer.plan import run_plan
    return run_plan(args)


# -- parser ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="clipfleet", description=(
        "Turn Common Crawl into a curated, searchable image-text dataset with a Celery fleet."))
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="start a fleet on this machine: Redis, one worker per queue, Flower")
    up.add_argument("--store", help="store URI the fleet will write to; checked for writes at start")
    up.add_argument("--broker", help="Redis URL of an existing broker (default: start an embedded one)")
    up.add_argument("--queues", default="all", help=f"all, or a comma list of: {', '.join(REGISTRY.queue_names())}")
    up.add_argument("--flower-port", type=int, help="port for Flower (default: a free one)")
    up.add_argument("--concurrency", type=int, help="processes per worker (default: cores for CPU queues, 1 for model queues)")
    up.set_defaults(func=cmd_up)

    wk = sub.add_parser("worker", help="start one worker for a fleet node")
    wk.add_argument("--queues", required=True, help=f"comma list of: {', '.join(REGISTRY.queue_names())}")
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
    rn.add_argument("--offline", action="store_true", help="never reach the model hub: models missing from the model cache refuse the run")
    rn.add_argument("--until", choices=REGISTRY.names(),
                    help=f"stop after this stage (default: {REGISTRY.names()[-1]}, the last)")
    for name, cls in sections().items():
        add_flags(rn, cls, titles()[name])
    rn.set_defaults(func=cmd_run)

    st = sub.add_parser("status", help="what a run has done: shards per stage, counts, failures")
    st.add_argument("--store", required=True, help="the run's store")
    st.add_argument("--json", action="store_true", help="print JSON instead of a table")
    st.add_argument("--broker", help="Redis URL of the fleet (default: $CLIPFLEET_BROKER): adds in flight and "
                                     "queued, and re-sends shards no live worker holds")
    st.add_argument("--no-recover", action="store_true", help="with a broker, only look: re-send nothing")
    st.add_argument("--rebuild", action="store_true", help="with a broker, rebuild the run state it keeps "
                                                           "from the markers (it is rebuilt by itself when missing)")
    st.set_defaults(func=cmd_status)

    td = sub.add_parser("takedown", help="remove samples from the serving index and the published dataset, without a rebuild")
    td.add_argument("--store", required=True, help="the run's store")
    which = td.add_mutually_exclusive_group(required=True)
    which.add_argument("--urls", metavar="FILE", help="file or URI with one image URL a line")
    which.add_argument("--hashes", metavar="FILE", help="file or URI with one md5 or sha256 image hash a line")
    which.add_argument("--phashes", metavar="FILE",
                       help="file with one perceptual hash a line (phash:<16 hex>[/<max hamming distance>]) or "
                            "the path of an image to hash: removes the picture's copies in the run (re-encoded, "
                            "resized, lightly cropped) and blocklists them for later runs")
    td.add_argument("--reason", default="", help="why, kept in the takedown record under takedowns/")
    td.set_defaults(func=cmd_takedown)

    rf = sub.add_parser("retry-failed", help="fetch again, in new shards, the URLs whose download failed for a "
                                             "transient reason (timeouts, 5xx, DNS, connection resets)")
    rf.add_argument("--store", required=True, help="the run's store")
    rf.add_argument("--broker", help="Redis URL of a running fleet (default: start an embedded fleet)")
    rf.set_defaults(func=cmd_retry_failed)

    dm = sub.add_parser("demo", help="run the whole pipeline offline on a local synthetic web")
    dm.add_argument("--store", default="demo-store", help="where the demo run writes (default %(default)s); the sandbox world goes beside it")
    dm.add_argument("--samples", type=int, default=2000, help="images in the synthetic web (default %(default)s)")
    dm.add_argument("--serve", action="store_true", help="after the run, serve search (and the synthetic web "
                                                       "its images live on) until Ctrl-C")
    dm.add_argument("--port", type=int, default=1234, help="with --serve: the search port (default %(default)s)")
    dm.set_defaults(func=cmd_demo)

    mt = sub.add_parser("metrics", help="export queue lengths (waiting and reserved) for Prometheus")
    mt.add_argument("--broker", help="Redis URL of the fleet (default: $CLIPFLEET_BROKER)")
    mt.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    mt.add_argument("--port", type=int, default=9808, help="port of /metrics (default %(default)s)")
    mt.add_argument("--interval", type=float, default=5.0, help="seconds between broker reads (default %(default)s)")
    mt.set_defaults(func=cmd_metrics)

    from clipfleet.search.settings import ServeSettings
    sv = sub.add_parser("serve", help="serve a run's index: clip back's API, a web UI, /metrics")
    sv.add_argument("--store", required=True, help="the run's store (a directory or s3://bucket/prefix)")
    add_flags(sv, ServeSettings, "service")
    sv.set_defaults(func=cmd_serve)

    ss = sub.add_parser("subset", help="write the samples nearest a text query as a parquet img2dataset downloads")
    ss.add_argument("--store", required=True, help="the run's store")
    ss.add_argument("--query", required=True, help="the text to search for")
    ss.add_argument("--k", type=int, default=1000, help="samples to write (default %(default)s); the search goes "
                                                        "deeper until that many pass the filters")
    ss.add_argument("--max-punsafe", type=float, help="drop samples whose punsafe is above this (LAION: 0.5)")
    ss.add_argument("--max-pwatermark", type=float, help="drop samples whose pwatermark is above this")
    ss.add_argument("--min-aesthetic", type=float, help="drop samples whose aesthetic score is under this")
    ss.add_argument("--deduplicate", action="store_true", help="drop near-duplicate images (cosine >= 0.94)")
    ss.add_argument("--language", type=lambda t: [p.strip() for p in t.split(",")], metavar="A,B",
                    help="keep only these languages (comma list)")
    ss.add_argument("--modality", choices=("image", "text"), default="image",
                    help="search the image or the text index (default %(default)s)")
    ss.add_argument("--cache-dir", metavar="DIR", help="where the search metadata is built (as for serve)")
    ss.add_argument("--out", required=True, help="the parquet file to write")
    ss.set_defaults(func=cmd_subset)

    rp = sub.add_parser("report", help="the run as one self-contained HTML page: funnel, languages, "
                                       "similarity, tags, sizes, throughput, samples")
    rp.add_argument("--store", required=True, help="the run's store (a directory or s3://bucket/prefix); "
                                                   "a running run reports what is finished")
    rp.add_argument("--out", required=True, help="the HTML file to write")
    rp.add_argument("--max-shards", type=int, default=32, help="read the tables of at most this many shards "
                                                               "per stage, evenly spread (default %(default)s); "
                                                               "markers are always all read")
    rp.add_argument("--grid", type=int, default=12, help="kept and dropped samples shown (default %(default)s each)")
    rp.set_defaults(func=cmd_report)

    cd = sub.add_parser("card", help="write the run's dataset card, <store>/README.md (Hugging Face format: "
                                     "configs, counts, filters, models, refusals, takedowns)")
    cd.add_argument("--store", required=True, help="the run's store (a directory or s3://bucket/prefix)")
    cd.set_defaults(func=cmd_card)

    rf = sub.add_parser("refilter", help="re-apply a filter to a finished run without recomputing: keep the top "
                                         "P%% by CLIP similarity per language bucket, and/or the samples whose image "
                                         "cluster is nearest to target embeddings (DataComp's filters), exactly once")
    rf.add_argument("--store", required=True, help="the run's store (a directory or s3://bucket/prefix)")
    rf.add_argument("--keep-top-percent", type=float, metavar="P",
                    help="the share of each bucket's judged samples to publish, best first, across the whole run")
    rf.add_argument("--keep-near", action="append", metavar="TARGETS",
                    help="DataComp's image-based filter: cluster the run's image embeddings and keep the clusters "
                         "nearest to a target; TARGETS is a .npy of vectors in the run's embedding space, a .txt "
                         "of captions (one a line), an image or a folder of images, or a caption, embedded by the "
                         "run's model; repeatable; "
                         "with --keep-top-percent, both must keep a sample")
    rf.add_argument("--clusters", type=int, metavar="K",
                    help="k-means clusters for --keep-near (default: the square root of the embedded samples)")
    rf.set_defaults(func=cmd_refilter)

    pl = sub.add_parser("plan", help="workers, GPUs, storage, Redis memory and bandwidth for N samples in D days")
    pl.add_argument("--samples", type=float, required=True, help="published (kept) samples wanted, e.g. 5.85e9")
    pl.add_argument("--days", type=float, required=True, help="wall-clock days for the whole run")
    src_plan = pl.add_mutually_exclusive_group()
    src_plan.add_argument("--from-bench", metavar="FILE", help="per-worker throughput from `make bench`'s "
                                                               ".bench/results.json")
    src_plan.add_argument("--store", help="per-worker throughput, success and keep rates from a run's markers")
    pl.add_argument("--image-size", type=int, help="stored image size the storage is sized for (default: "
                                                   "the run's with --store, else 256; measured bytes win)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.set_defaults(func=cmd_plan)

    from clipfleet.producer.train_head import register as register_train_head
    register_train_head(sub)

    try:
        from clipfleet.sandbox.cli import register as register_sandbox
    except ImportError:
        pass
    else:
        register_sandbox(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
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


def entry() -> None:
    """The console script. Once the command is over, the process ends without tearing down native
    thread pools: pyarrow's can still abort a finished command at interpreter exit with "terminate
    called without an active exception" (apache/arrow#34314), turning a good run's exit 0 into -6."""
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
