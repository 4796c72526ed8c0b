"""`hwrjax serve`: the model of a workdir over HTTP (a JSON API and a page to draw digits on) until interrupted."""

from __future__ import annotations

import argparse
import math
import sys
import time

from absl import logging

from hwrjax.apps.recognize import Recognizer
from hwrjax.apps.serve import Limits, bind_socket, create_app, is_loopback, uvicorn_config
from hwrjax.cli.toolkit import ArgumentParser, run_command
from hwrjax.core.errors import HwrjaxError
from hwrjax.inference.loader import load_model


def serve_main(argv: list[str]) -> int:
    """`hwrjax serve`: serves the model of a workdir over HTTP until interrupted."""
    d = Limits()
    parser = ArgumentParser(
        prog="hwrjax serve",
        description="Serve a trained model: a JSON API (POST /api/recognize) and a page to draw digits on (GET /).")
    parser.add_argument("--workdir", required=True, help="workdir of a training run")
    parser.add_checkpoint()
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="also accept requests whose Host header is NAME (a DNS name of this machine); repeatable")
    parser.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                        help="let pages from ORIGIN (https://example.org) call the API, with CORS headers; repeatable")
    parser.add_argument("--max-upload-mb", type=float, default=d.max_upload_bytes / 2**20,
                        help="largest accepted upload in MiB (default 16)")
    parser.add_argument("--max-in-flight", type=int, default=d.max_in_flight,
                        help=f"readings answered at once; more get 503 (default {d.max_in_flight})")
    parser.add_argument("--workers", type=int, default=d.workers,
                        help=f"threads preprocessing small images (default {d.workers})")
    parser.add_argument("--slow-timeout", type=float, default=d.slow_timeout,
                        help=f"seconds the slow lane may spend reading one large image (default {d.slow_timeout:g})")
    parser.add_argument("--slow-memory-mb", type=int, default=d.slow_memory_mb,
                        help=f"MiB the slow lane may use reading one large image (default {d.slow_memory_mb})")
    parser.add_argument("--max-batch", type=int, default=d.max_batch,
                        help=f"digits per model call, a power of two (default {d.max_batch})")
    parser.add_argument("--timeout", type=float, default=d.body_timeout,
                        help=f"seconds allowed for a request's head and for its body (default {d.body_timeout:g})")
    parser.add_argument("--keep-alive", type=float, default=d.keep_alive,
                        help=f"seconds an idle connection stays open (default {d.keep_alive:g})")
    parser.add_argument("--max-connections", type=int, default=d.max_connections,
                        help=f"open connections; one more evicts the longest idle (default {d.max_connections})")
    parser.add_argument("--no-access-log", action="store_true", help="do not log one line per request")
    parser.add_argument("--min-confidence", type=float, default=0.0,
                        help="answers whose calibrated probability is below this (0..1) are marked unsure "
                             "(default 0: never); a request's min_confidence query overrides it")
    return run_command(parser, argv, lambda args: _serve(parser, args), command=parser.prog)


def _serve(parser: ArgumentParser, args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    if not args.max_upload_mb > 0 or not math.isfinite(args.max_upload_mb):
        parser.error("--max-upload-mb must be a positive number")
    if not 0.0 <= args.min_confidence <= 1.0:
        parser.error(f"--min-confidence must be in [0, 1], got {args.min_confidence}")
    try:
        limits = Limits(max_upload_bytes=max(1, int(args.max_upload_mb * 2**20)), max_in_flight=args.max_in_flight,
                        workers=args.workers, max_batch=args.max_batch, body_timeout=args.timeout,
                        header_timeout=args.timeout, keep_alive=args.keep_alive, slow_timeout=args.slow_timeout,
                        slow_memory_mb=args.slow_memory_mb,
                        max_connections=args.max_connections)
    except ValueError as e:  # "field must ..." said of the flag that set it
        field, _, rest = str(e).partition(" ")
        flags = {"max_upload_bytes": "--max-upload-mb", "body_timeout": "--timeout", "header_timeout": "--timeout"}
        parser.error(f"{flags.get(field, '--' + field.replace('_', '-'))} {rest}")

    import uvicorn

    recognizer = Recognizer.from_loaded(load_model(args.workdir, args.checkpoint), min_confidence=args.min_confidence)
    try:
        app = create_app(recognizer, limits, host=args.host, allow_hosts=args.allow_host,
                         allow_origins=args.allow_origin)
        sock = bind_socket(args.host, args.port)
    except ValueError as e:  # a bad --allow-* value, or a --host / --port that cannot be bound
        raise HwrjaxError(str(e)) from None
    if not recognizer.calibrated:
        logging.warning("%s has no fitted temperature for step %s: probabilities are uncalibrated (T=1); fit one "
                        "with `hwrjax calibrate --workdir=%s`.", args.workdir, recognizer.step, args.workdir)
    if not is_loopback(args.host):
        logging.warning("Listening on %s: other machines can reach this service; it has no authentication.",
                        args.host)
    t0 = time.perf_counter()
    recognizer.warmup(limits.max_batch)
    logging.info("Compiled batch sizes 1-%d in %.1f s.", limits.max_batch, time.perf_counter() - t0)
    app.state.lanes.slow.start()
    host, port = sock.getsockname()[:2]
    sys.stderr.write(f"hwrjax serve: http://{host if ':' not in host else f'[{host}]'}:{port}/ (Ctrl-C to stop)\n")
    config = uvicorn_config(app, log_level="info", access_log=not args.no_access_log, timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0
