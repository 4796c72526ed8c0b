"""`hwrjax serve`: an HTTP service reading handwritten digits, with a page to draw them on.

Built on Starlette (ASGI) and served by uvicorn. Routes:
  GET  /                 the drawing page (hwrjax/static/index.html)
  GET  /api/health       {"status": "ok", "model", "step"}
  POST /api/recognize    body: the raw image bytes, or multipart/form-data with a file field
                         `image`; query `mode=number|digit` (default number) ->
                         {"text", "digits", "probabilities", "latency_ms"}
Errors are JSON {"error": "..."}: 400 for a body that is not an image or has no ink,
413 for a body over `max_upload_bytes` (refused by Content-Length, or while streaming
before the rest is read), 404/405 for unknown routes and methods.

Preprocessing and the model call run in worker threads (at most `workers` at once), so
the event loop keeps serving; the Recognizer serializes its model calls with a lock.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.resources
import ipaddress
import os
import socket
import sys
import threading
import time
from typing import Any, Iterator

from absl import logging

try:
    import anyio
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route
except ModuleNotFoundError as e:  # The serving libraries are an optional extra.
    raise ModuleNotFoundError(f"hwrjax serve needs {e.name}; install it with pip install 'hwrjax[serve]'",
                              name=e.name) from None

from hwrjax.errors import HwrjaxError
from hwrjax.preprocess import ImageError
from hwrjax.recognize import MODES, Recognizer, quiet_loading

__all__ = ["DEFAULT_MAX_UPLOAD_BYTES", "create_app", "serve_in_thread", "serve_main"]

DEFAULT_MAX_UPLOAD_BYTES = 16 * 1024 * 1024  # a large phone photo fits; the page sends ~10 KB
_FORM_OVERHEAD = 64 * 1024  # multipart headers and boundaries on top of the image itself


@functools.lru_cache(maxsize=1)
def _page() -> str:
    return (importlib.resources.files("hwrjax") / "static" / "index.html").read_text(encoding="utf-8")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class _TooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (by Content-Length or while streaming) more than `limit` bytes."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise HTTPException(400, f"bad Content-Length header {length!r}")
        if int(length) > limit:
            raise _TooLarge(int(length))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge(None)
        chunks.append(chunk)
    return b"".join(chunks)


async def _image_bytes(request: Request, body: bytes, limit: int) -> bytes:
    """The `image` file field of a multipart form whose whole body is `body`."""
    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=16, max_part_size=limit)
    except HTTPException as e:
        raise HTTPException(400, f"bad multipart upload: {e.detail}") from None
    try:
        field = form.get("image")
        if field is None or isinstance(field, str):
            raise HTTPException(400, "multipart upload needs a file field named 'image'")
        return await field.read()
    finally:
        await form.close()


def create_app(recognizer: Recognizer, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               workers: int | None = None) -> Starlette:
    """The ASGI app serving `recognizer`: JSON API and drawing page."""
    if max_upload_bytes < 1:
        raise ValueError(f"max_upload_bytes must be positive, got {max_upload_bytes}")
    # Bounds memory (each decoded photo can be large) and CPU contention; the model call itself is locked.
    workers = workers or max(2, os.cpu_count() or 2)
    limiter = anyio.CapacityLimiter(workers)

    def read(data: bytes, mode: str) -> dict[str, Any]:
        r = recognizer.read(data, mode)
        return {"text": r.text, "digits": r.digits, "probabilities": r.probabilities, "latency_ms": r.latency_ms}

    async def page(request: Request) -> Response:
        return HTMLResponse(_page(), headers={"Cache-Control": "no-cache"})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": recognizer.name, "step": recognizer.step})

    async def recognize(request: Request) -> Response:
        mode = request.query_params.get("mode", "number")
        if mode not in MODES:
            return _error(400, f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        try:
            multipart = request.headers.get("content-type", "").lower().startswith("multipart/form-data")
            body = await _read_body(request, max_upload_bytes + (_FORM_OVERHEAD if multipart else 0))
            data = await _image_bytes(request, body, max_upload_bytes) if multipart else body
        except _TooLarge as e:
            size = f" ({e.args[0]:,} bytes)" if e.args[0] else ""
            return _error(413, f"upload too large{size}; the limit is {max_upload_bytes:,} bytes")
        except ClientDisconnect:
            return Response(status_code=400)
        if len(data) > max_upload_bytes:
            return _error(413, f"image too large ({len(data):,} bytes); the limit is {max_upload_bytes:,} bytes")
        if not data:
            return _error(400, "empty upload; POST the bytes of a PNG, JPEG or BMP image")
        try:
            result = await anyio.to_thread.run_sync(read, data, mode, limiter=limiter)
        except ImageError as e:
            return _error(400, str(e))
        return JSONResponse(result)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    async def server_error(request: Request, exc: Exception) -> Response:
        logging.error("Unhandled error on %s %s: %r", request.method, request.url.path, exc)
        return _error(500, f"internal error ({type(exc).__name__}); see the server log")

    routes = [
        Route("/", page, methods=["GET"]),
        Route("/api/health", health, methods=["GET"]),
        Route("/api/recognize", recognize, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port; raises HwrjaxError with the reason if it cannot be had."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise HwrjaxError(f"cannot resolve --host {host!r} ({e.strerror}); use an address such as 127.0.0.1")
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise HwrjaxError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host")
    sock.set_inheritable(True)
    return sock


@contextlib.contextmanager
def serve_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Runs `app` under uvicorn in a background thread; yields its base URL, stops on exit.

    For tests, notebooks and benchmarks; port 0 picks a free port.
    """
    import uvicorn

    sock = _bind(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="hwrjax-serve")
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise HwrjaxError(f"the server on {host}:{sock.getsockname()[1]} did not start")
            time.sleep(0.01)
        bound, port = sock.getsockname()[:2]
        yield f"http://{bound if ':' not in bound else f'[{bound}]'}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve_main(argv: list[str]) -> int:
    """`hwrjax serve`: serves the model of a workdir over HTTP until interrupted."""
    parser = argparse.ArgumentParser(
        prog="hwrjax serve",
        description="Serve a trained model: a JSON API (POST /api/recognize) and a page to draw digits on (GET /).")
    parser.add_argument("--workdir", required=True, help="workdir of a training run")
    parser.add_argument("--checkpoint", default="best", help="best (default), latest, or a step number")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_BYTES / 2**20,
                        help="largest accepted upload in MiB (default 16)")
    parser.add_argument("--no-access-log", action="store_true", help="do not log one line per request")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    if args.max_upload_mb <= 0:
        parser.error("--max-upload-mb must be positive")

    import uvicorn

    from hwrjax.logs import quiet_library_logs

    quiet_library_logs()
    try:
        with quiet_loading():
            recognizer = Recognizer.from_workdir(args.workdir, args.checkpoint)
        sock = _bind(args.host, args.port)
    except HwrjaxError as e:
        sys.stderr.write(f"hwrjax serve: error: {e}\n")
        return 2
    if not _is_loopback(args.host):
        logging.warning("Listening on %s: other machines can reach this service; it has no authentication.",
                        args.host)
    t0 = time.perf_counter()
    recognizer.warmup(16)
    logging.info("Compiled batch sizes 1-16 in %.1f s.", time.perf_counter() - t0)
    app = create_app(recognizer, max_upload_bytes=int(args.max_upload_mb * 2**20))
    host, port = sock.getsockname()[:2]
    sys.stderr.write(f"hwrjax serve: http://{host if ':' not in host else f'[{host}]'}:{port}/ (Ctrl-C to stop)\n")
    config = uvicorn.Config(app, log_level="info", access_log=not args.no_access_log, timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0
