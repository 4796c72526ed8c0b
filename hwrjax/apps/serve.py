"""`hwrjax serve`: an HTTP service reading handwritten digits, with a page to draw them on.

Built on Starlette (ASGI) and served by uvicorn. Routes:
  GET  /                 the drawing page (hwrjax/apps/static/index.html)
  GET  /api/health       {"status": "ok", "model", "step", "temperature", "calibrated", "min_confidence"}
  POST /api/recognize    body: the raw image bytes, or multipart/form-data with a file field
                         `image`; query `mode=number|digit` (default number) ->
                         {"text", "digits", "probabilities", "unsure", "min_confidence", "latency_ms"};
                         query `min_confidence=0..1` (default the server's --min-confidence)
                         marks the answer `unsure` when a digit's probability is below it
                         (the digits are still given). Probabilities are calibrated with the
                         run's fitted temperature (hwrjax.inference.calibration).
Errors are JSON {"error": "..."}: 400 for a body that is not an image or has no ink,
403 for a foreign Host or a cross-origin request, 408 for an upload slower than
`body_timeout`, 413 for a body over `max_upload_bytes` (refused by Content-Length, or while
streaming before the rest is read), 503 with Retry-After when `max_in_flight` readings are
already being answered, 404/405 for unknown routes and methods.

How a reading is made: small images (the page's drawings, scans up to LIGHT_PIXELS) are
preprocessed in a pool of `workers` threads. Larger ones (photos, hostile sizes) go to the
slow lane: one worker process at the lowest CPU priority (nice 19) with its own GIL, at most
`slow_memory_mb` and `slow_timeout` per image (it is killed and restarted past them), at most
`slow_queue` waiting (more get a prompt 503), so they cannot delay the drawings nor take the
service down. The digit crops of all requests waiting at that moment are classified in one
model call by a MicroBatcher, padded to a power-of-two batch size (each compiled at start).
`latency_ms` is the server's time from the complete upload to the reading.

Who may use it: requests must name this server in their Host header (the bound address,
its loopback aliases, or a name given with --allow-host), which defeats DNS rebinding;
POSTs from another origin (Origin, or Sec-Fetch-Site when Origin is absent) are refused
unless the origin was allowed with --allow-origin, which also turns on CORS headers for it.

Connections: a request head must arrive within `header_timeout` seconds of the connection
opening or the previous response (slowloris), an idle connection is closed after `keep_alive`
seconds, at most `max_connections` are open (a new one evicts the connection that has waited
longest for a request head), and a head is at most `max_header_bytes`. Memory is bounded by
max_in_flight * max_upload_bytes for bodies, plus `workers` small images being read, plus the
slow lane's cap.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import importlib.resources
import io
import ipaddress
import itertools
import math
import multiprocessing
import os
import queue
import socket
import sys
import threading
import time
import warnings
from typing import Any, AsyncIterator, Iterator, Sequence

import numpy as np
from absl import logging

try:
    import anyio
    import h11
    from PIL import Image
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ModuleNotFoundError as e:  # The serving libraries are an optional extra.
    raise ModuleNotFoundError(f"hwrjax serve needs {e.name}; install it with pip install 'hwrjax[serve]'",
                              name=e.name) from None

from hwrjax.apps import preprocess
from hwrjax.apps.preprocess import ImageError
from hwrjax.apps.recognize import MODES, Reading, Recognizer, check_min_confidence, prepare_image
from hwrjax.core.errors import HwrjaxError

__all__ = ["DEFAULT_MAX_UPLOAD_BYTES", "LIGHT_PIXELS", "LIGHT_SIDE", "Limits", "MicroBatcher", "create_app",
           "bind_socket", "is_loopback", "serve_in_thread",
           "uvicorn_config"]

DEFAULT_MAX_UPLOAD_BYTES = 16 * 1024 * 1024  # a large phone photo fits; the page sends ~2 KB
_FORM_OVERHEAD = 64 * 1024  # multipart headers and boundaries on top of the image itself
# Images of at most this many pixels, this long a side and LIGHT_BYTES take the fast lane: the
# page's 640x256 canvas, tight crops, small scans. Larger ones (photos, hostile sizes, long thin
# strips) take the slow lane.
LIGHT_PIXELS = 512 * 512
LIGHT_SIDE = 1024
LIGHT_BYTES = 1024 * 1024
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds on the work, memory and connections of the service (defaults suit one machine)."""

    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES  # largest accepted image; more is a 413
    max_in_flight: int = 32  # readings being answered at once; more get a prompt 503
    workers: int = 2  # threads preprocessing small images
    slow_queue: int = 2  # large images waiting for the slow lane; more get a prompt 503
    slow_timeout: float = 10.0  # seconds the slow lane may spend on one image; longer is a 400
    slow_memory_mb: int = 1024  # memory the slow lane may use on one image; more is a 400
    max_batch: int = 16  # digit crops per model call (a power of two, at least max_digits)
    body_timeout: float = 10.0  # seconds to receive a whole upload; slower is a 408
    header_timeout: float = 10.0  # seconds for a request head to arrive; slower connections are closed
    keep_alive: float = 5.0  # seconds an idle keep-alive connection stays open
    max_connections: int = 1024  # open connections; a new one beyond evicts the longest idle
    max_header_bytes: int = 16 * 1024  # largest request line plus headers

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_in_flight", "workers", "slow_queue", "slow_memory_mb", "max_batch",
                     "max_connections", "max_header_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("body_timeout", "header_timeout", "keep_alive", "slow_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.max_batch & (self.max_batch - 1):
            raise ValueError(f"max_batch must be a power of two (each is compiled once), got {self.max_batch}")


@functools.lru_cache(maxsize=1)
def _page() -> str:
    return (importlib.resources.files("hwrjax.apps") / "static" / "index.html").read_text(encoding="utf-8")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class _TooLarge(Exception):
    pass


class _Busy(Exception):
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


# ------------------------------------------------------------------------ batching and lanes


class MicroBatcher:
    """Classifies the crops of concurrent requests together: one model call for all that wait.

    A worker thread takes every submission waiting when it is free, up to `max_batch` crops,
    and classifies them in one `recognizer.classify` call (which pads to a power of two, so
    only the sizes up to `max_batch` are ever compiled); each submission gets its own rows.
    """

    def __init__(self, recognizer: Recognizer, max_batch: int):
        if max_batch < recognizer.max_digits or max_batch > recognizer.max_batch:
            raise ValueError(f"max_batch must be in {recognizer.max_digits}..{recognizer.max_batch} (one number's "
                             f"digits must fit one call), got {max_batch}")
        self.recognizer = recognizer
        self.max_batch = max_batch
        self.batch_sizes: list[int] = []  # crops per model call, newest last (the last 1,000)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()

    def submit(self, crops: np.ndarray) -> concurrent.futures.Future:
        """Queues crops [k, 28, 28]; the future's result is their probabilities [k, classes]."""
        if not 1 <= len(crops) <= self.max_batch:
            raise ValueError(f"submit takes 1..{self.max_batch} crops, got {len(crops)}")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((crops, future))
        with self._start:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="hwrjax-batcher")
                self._thread.start()
        return future

    def waiting(self) -> int:
        """Submissions queued and not yet taken by the worker."""
        return self._queue.qsize()

    def close(self) -> None:
        """Stops the worker after the submissions already queued."""
        with self._start:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()

    def _run(self) -> None:
        carry = None
        while True:
            item = carry if carry is not None else self._queue.get()
            carry = None
            if item is None:
                return
            batch, size = [item], len(item[0])
            while size < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None or size + len(nxt[0]) > self.max_batch:
                    carry = nxt
                    break
                batch.append(nxt)
                size += len(nxt[0])
            batch = [(crops, f) for crops, f in batch if f.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                probs = self.recognizer.classify(np.concatenate([crops for crops, _ in batch]))
            except Exception as e:  # Every waiting request gets the error; the worker lives on.
                for _, f in batch:
                    f.set_exception(e)
                continue
            self.batch_sizes = self.batch_sizes[-999:] + [len(probs)]
            offset = 0
            for crops, f in batch:
                f.set_result(probs[offset:offset + len(crops)])
                offset += len(crops)


def _is_light(data: bytes) -> bool:
    """True for uploads cheap to read: few bytes and, by the image header, few pixels and no long side.

    Also true for images over preprocess's pixel limits: load_image refuses them from their
    header, before decoding anything, so the slow lane would only add a trip to its process.
    """
    if len(data) > LIGHT_BYTES:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:  # Reads the header only.
                w, h = im.size
    except Image.DecompressionBombError:
        return True  # over Pillow's own guard, so over MAX_PIXELS too: refused from the header
    except Exception:  # Not an image Pillow knows: preprocessing refuses it at once.
        return True
    refused = max(preprocess.MAX_PIXELS, preprocess.MAX_JPEG_PIXELS)  # over every format's limit
    return (w * h <= LIGHT_PIXELS and max(w, h) <= LIGHT_SIDE) or w * h > refused


def _data_bytes() -> int:
    """This process's data segment size (Linux /proc), which RLIMIT_DATA bounds; 0 if unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _slow_lane_worker(conn: Any, max_digits: int, memory_bytes: int) -> None:
    """The slow lane's process: reads the images sent over `conn` one at a time, nice'd, with capped memory."""
    with contextlib.suppress(OSError):
        os.nice(19)  # the lowest priority: drawings and the event loop come first whenever the cores are busy
    if sys.platform.startswith("linux"):
        import resource

        with contextlib.suppress(ValueError, OSError):
            cap = _data_bytes() + memory_bytes
            resource.setrlimit(resource.RLIMIT_DATA, (cap, resource.getrlimit(resource.RLIMIT_DATA)[1]))
    conn.send(("ready", None))
    while True:
        try:
            data, mode = conn.recv()
        except (EOFError, OSError):
            return
        try:
            reply = ("ok", prepare_image(data, mode, max_digits))
        except ImageError as e:
            reply = ("error", str(e))
        except MemoryError:
            reply = ("error", f"reading this image needs over {memory_bytes // 2**20} MiB of memory; downscale it")
        except Exception as e:  # A bug: reported to the parent, which answers 500 and logs it.
            reply = ("bug", f"{type(e).__name__}: {e}")
        del data
        conn.send(reply)


class _SlowLane:
    """A worker process reading large images one at a time, apart from the server's own threads.

    Its own GIL and a lower CPU priority keep it from delaying the fast lane and the event
    loop; its memory is capped (RLIMIT_DATA), and it is killed and started anew when an image
    takes over `timeout` seconds or it dies, so no image can take the service down.
    """

    _START_TIMEOUT = 120.0  # seconds for a new worker to import its modules (a loaded machine is slow)

    def __init__(self, max_digits: int, timeout: float, memory_bytes: int):
        self.max_digits, self.timeout, self.memory_bytes = max_digits, timeout, memory_bytes
        self.reads = 0  # images answered (read or refused), for tests and logs
        self._proc: Any = None
        self._conn: Any = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Starts the worker process unless it is running."""
        with self._lock:
            self._ensure()

    def _ensure(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            return
        self._stop()
        ctx = multiprocessing.get_context("spawn")  # never fork a process that runs JAX threads
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_slow_lane_worker, args=(child, self.max_digits, self.memory_bytes), daemon=True,
                           name="hwrjax-slow-lane")
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent
        if not parent.poll(self._START_TIMEOUT) or parent.recv()[0] != "ready":
            self._stop()
            raise RuntimeError("the slow-lane worker process did not start")

    def _stop(self) -> None:
        proc, conn, self._proc, self._conn = self._proc, self._conn, None, None
        if proc is not None:
            proc.kill()
            proc.join(timeout=10)
        if conn is not None:
            conn.close()

    def prepare(self, data: bytes, mode: str) -> np.ndarray:
        """MNIST-form crops of one image, read in the worker; raises ImageError."""
        with self._lock:
            self._ensure()
            conn = self._conn
            try:
                conn.send((data, mode))
                reply = conn.recv() if conn.poll(self.timeout) else ("timeout", None)
            except (EOFError, OSError):
                reply = ("died", None)
            if reply[0] in ("timeout", "died"):
                self._stop()
                logging.warning("Slow-lane worker %s on an image of %d bytes; starting a new one.",
                                "timed out" if reply[0] == "timeout" else "died", len(data))
                raise ImageError(f"reading this image took over {self.timeout:g} s or "
                                 f"{self.memory_bytes // 2**20} MiB; send a smaller image")
            self.reads += 1
        kind, value = reply
        if kind == "ok":
            return value
        if kind == "error":
            raise ImageError(value)
        raise RuntimeError(f"the slow lane failed on an image: {value}")

    def close(self) -> None:
        """Stops the worker process (an image being read gets an ImageError)."""
        proc = self._proc
        if proc is not None:
            proc.kill()  # first, so a read in progress ends and lets go of the lock
        with self._lock:
            self._stop()


class _Lanes:
    """Preprocessing: `workers` threads for small images, a worker process (the slow lane) for large ones."""

    def __init__(self, recognizer: Recognizer, limits: Limits):
        self.recognizer = recognizer
        self.limits = limits
        self.slow = _SlowLane(recognizer.max_digits, limits.slow_timeout, limits.slow_memory_mb * 2**20)
        self.slow_waiting = 0
        self._pools: tuple[concurrent.futures.Executor, concurrent.futures.Executor] | None = None

    def _executors(self) -> tuple[concurrent.futures.Executor, concurrent.futures.Executor]:
        if self._pools is None:  # Made on first use, so an app can be started again after close().
            self._pools = (concurrent.futures.ThreadPoolExecutor(self.limits.workers, thread_name_prefix="hwrjax-prep"),
                           concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hwrjax-slow-lane"))
        return self._pools

    def _prepare_light(self, data: bytes, mode: str) -> np.ndarray | None:
        return self.recognizer.prepare(data, mode) if _is_light(data) else None

    async def prepare(self, data: bytes, mode: str) -> np.ndarray:
        """MNIST-form crops of an upload; raises ImageError, or _Busy when the slow lane is full."""
        loop = asyncio.get_running_loop()
        light, slow = self._executors()
        crops = await loop.run_in_executor(light, self._prepare_light, data, mode)
        if crops is not None:
            return crops
        if self.slow_waiting >= self.limits.slow_queue:
            raise _Busy("large images")
        self.slow_waiting += 1
        try:
            return await loop.run_in_executor(slow, self.slow.prepare, data, mode)
        finally:
            self.slow_waiting -= 1

    def close(self) -> None:
        """Stops the threads and the worker process; work not started is dropped."""
        pools, self._pools = self._pools, None
        for pool in pools or ():
            pool.shutdown(wait=False, cancel_futures=True)
        self.slow.close()


# ------------------------------------------------------------------------ who may call


def _host_name(value: str) -> str:
    """The host part of a Host header or an Origin's authority: lower case, without port or brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    """True when `host` is a loopback address or name (only this machine can connect)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _Guard:
    """ASGI middleware refusing foreign Host headers and cross-origin writes; CORS for allowed origins."""

    def __init__(self, app: Any, host: str, allow_hosts: Sequence[str], allow_origins: Sequence[str]):
        self.app = app
        bound = _host_name(host)
        self.any_ip = bound in ("", "0.0.0.0", "::")  # bound to every interface: any address literal names it
        names = {bound, *(_host_name(h) for h in allow_hosts)}
        if self.any_ip or is_loopback(bound):
            names.update(_LOOPBACK_NAMES)
        self.hosts = frozenset(names - {""})
        self.origins = frozenset(o.rstrip("/").lower() for o in allow_origins)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        name = _host_name(host)
        if not (name in self.hosts or (self.any_ip and _is_ip(name))):
            shown = host[:100]
            refusal = _error(403, f"Host {shown!r} is not served here; use the server's own address, or start "
                                  f"hwrjax serve with --allow-host={_host_name(shown) or 'NAME'}")
            return await refusal(scope, receive, send)
        origin = headers.get("origin", "").rstrip("/").lower()
        own = origin == f"{scope.get('scheme', 'http')}://{host.strip().lower()}"
        allowed = bool(origin) and origin in self.origins
        method = scope["method"]
        if method == "OPTIONS" and origin and "access-control-request-method" in headers:
            if not allowed:
                return await _error(403, f"cross-origin requests from {origin[:100]!r} are refused; start hwrjax "
                                         "serve with --allow-origin=ORIGIN to allow one")(scope, receive, send)
            preflight = Response(status_code=204, headers={
                "Access-Control-Allow-Origin": origin, "Access-Control-Allow-Methods": "GET, POST",
                "Access-Control-Allow-Headers": "Content-Type", "Access-Control-Max-Age": "600", "Vary": "Origin"})
            return await preflight(scope, receive, send)
        if method not in _SAFE_METHODS:
            cross = (origin and not own) or headers.get("sec-fetch-site") in ("cross-site", "same-site")
            if cross and not allowed:
                who = repr(origin[:100]) if origin else "another site"
                return await _error(403, f"cross-origin requests from {who} are refused; start hwrjax serve with "
                                         "--allow-origin=ORIGIN to allow one")(scope, receive, send)
        if not allowed:
            return await self.app(scope, receive, send)

        async def send_with_cors(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"access-control-allow-origin", origin.encode("latin-1")),
                                                  (b"vary", b"Origin")]}
            await send(message)

        await self.app(scope, receive, send_with_cors)


# ------------------------------------------------------------------------ the app


def create_app(recognizer: Recognizer, limits: Limits | None = None, *, host: str = "127.0.0.1",
               allow_hosts: Sequence[str] = (), allow_origins: Sequence[str] = ()) -> Starlette:
    """The ASGI app serving `recognizer`: JSON API and drawing page, for a server bound to `host`."""
    limits = limits or Limits()
    for origin in allow_origins:
        if not origin.startswith(("http://", "https://")) or origin.rstrip("/").count("/") != 2:
            raise ValueError(f"an allowed origin (--allow-origin) is scheme://host[:port], like https://example.org; "
                             f"got {origin!r}")
    batcher = MicroBatcher(recognizer, limits.max_batch)
    lanes = _Lanes(recognizer, limits)
    in_flight = 0

    async def page(request: Request) -> Response:
        return HTMLResponse(_page(), headers={"Cache-Control": "no-cache"})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": recognizer.name, "step": recognizer.step,
                             "temperature": recognizer.temperature, "calibrated": recognizer.calibrated,
                             "min_confidence": recognizer.min_confidence})

    async def recognize(request: Request) -> Response:
        nonlocal in_flight
        if in_flight >= limits.max_in_flight:
            return _error(503, f"busy: {limits.max_in_flight} readings in progress; retry in a second",
                          {"Retry-After": "1"})
        in_flight += 1
        try:
            return await read(request)
        finally:
            in_flight -= 1

    async def read(request: Request) -> Response:
        mode = request.query_params.get("mode", "number")
        if mode not in MODES:
            return _error(400, f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        min_confidence = recognizer.min_confidence
        if "min_confidence" in request.query_params:
            try:
                min_confidence = check_min_confidence(float(request.query_params["min_confidence"]))
            except ValueError:
                return _error(400, f"min_confidence must be a number in [0, 1], got "
                                   f"{request.query_params['min_confidence'][:40]!r}")
        try:
            multipart = request.headers.get("content-type", "").lower().startswith("multipart/form-data")
            with anyio.fail_after(limits.body_timeout):
                body = await _read_body(request, limits.max_upload_bytes + (_FORM_OVERHEAD if multipart else 0))
            data = await _image_bytes(request, body, limits.max_upload_bytes) if multipart else body
        except _TooLarge as e:
            size = f" ({e.args[0]:,} bytes)" if e.args[0] else ""
            return _error(413, f"upload too large{size}; the limit is {limits.max_upload_bytes:,} bytes")
        except TimeoutError:
            return _error(408, f"the upload took over {limits.body_timeout:g} s; send it in one go",
                          {"Connection": "close"})
        except ClientDisconnect:
            return Response(status_code=400, headers={"Connection": "close"})
        if len(data) > limits.max_upload_bytes:
            return _error(413, f"image too large ({len(data):,} bytes); the limit is {limits.max_upload_bytes:,} bytes")
        if not data:
            return _error(400, "empty upload; POST the bytes of a PNG, JPEG or BMP image")
        t0 = time.perf_counter()
        try:
            crops = await lanes.prepare(data, mode)
        except ImageError as e:
            return _error(400, str(e))
        except _Busy:
            return _error(503, f"busy: {limits.slow_queue} large images are waiting; retry in a second, or send a "
                               f"smaller image (at most {LIGHT_PIXELS:,} pixels and {LIGHT_SIDE} a side is quick)",
                          {"Retry-After": "1"})
        probs = await asyncio.wrap_future(batcher.submit(crops))
        r = Reading.from_probabilities(probs, (time.perf_counter() - t0) * 1e3, min_confidence)
        return JSONResponse({"text": r.text, "digits": r.digits, "probabilities": r.probabilities,
                             "unsure": r.unsure, "min_confidence": min_confidence, "latency_ms": r.latency_ms})

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    async def server_error(request: Request, exc: Exception) -> Response:
        logging.error("Unhandled error on %s %s: %r", request.method, request.url.path, exc)
        return _error(500, f"internal error ({type(exc).__name__}); see the server log")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(lanes.close)
            await anyio.to_thread.run_sync(batcher.close)

    routes = [
        Route("/", page, methods=["GET"]),
        Route("/api/health", health, methods=["GET"]),
        Route("/api/recognize", recognize, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error},
                    middleware=[Middleware(_Guard, host=host, allow_hosts=allow_hosts, allow_origins=allow_origins)],
                    lifespan=lifespan)
    app.state.limits = limits
    app.state.batcher = batcher
    app.state.lanes = lanes
    return app


# ------------------------------------------------------------------------ the server


_WAIT_ORDER = itertools.count()  # orders the connections by when they began to wait for a head


class _GuardedH11(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for each request head and a cap on open connections.

    At the cap, a new connection evicts the one that has waited longest for a request head
    (idle and slowloris connections go first); only when every connection is busy with a
    request is the new one closed instead.
    """

    header_timeout = 10.0
    max_connections = 1024
    max_header_bytes = 16 * 1024

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        self.waiting_since: int | None = None  # when it began to await a request head, in _WAIT_ORDER
        self._head_bytes = 0  # bytes of the awaited head received so far ...
        self._head_tail = b""  # ... and its last 3, to find the blank line ending it across reads
        self._draining = False  # reading and dropping the body of a request answered without it
        self._drain_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            waiting = [c for c in self.connections
                       if c is not self and getattr(c, "waiting_since", None) is not None]
            if not waiting:
                logging.warning("Closing a new connection: %d are open and busy.", self.max_connections)
                transport.close()
                return
            min(waiting, key=lambda c: c.waiting_since).transport.close()
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_bytes, self._head_tail = 0, b""
        self.waiting_since = next(_WAIT_ORDER)  # a count, not loop.time(): uvloop's clock ticks in ms
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        self.waiting_since = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self._head_too_long(data):
            # h11 bounds only a head still incomplete after a read; one read can hold a longer one.
            message = b"request head over %d bytes" % self.max_header_bytes
            self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain\r\n"
                                 b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(message), message))
            self.transport.close()
            return
        super().data_received(data)
        if self._draining and self.conn.their_state is not h11.SEND_BODY:
            self._draining = False  # the unread body has ended: the connection can be used again
            if self._drain_timer is not None:
                self._drain_timer.cancel()
                self._drain_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self._arm_head_timer()
        if self.conn.their_state is not h11.IDLE:
            self._cancel_head_timer()

    def _head_too_long(self, data: bytes) -> bool:
        seen = self._head_tail + data
        ends = [i for i in (seen.find(b"\r\n\r\n"), seen.find(b"\n\n")) if i >= 0]  # h11 accepts bare LF too
        end = min(ends) if ends else -1
        if end >= 0:
            size = self._head_bytes + end - len(self._head_tail)
            self._head_bytes, self._head_tail = 0, b""
            return size > self.max_header_bytes
        self._head_bytes += len(data)
        self._head_tail = seen[-3:]
        return self._head_bytes > self.max_header_bytes

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE:
            self._arm_head_timer()
        elif self.conn.our_state is h11.DONE and self.conn.their_state is h11.SEND_BODY:
            # Answered before the body was read (413, 503, 403...): read and drop the rest, as a
            # lingering close does, so the client sees the answer rather than a reset; for at most
            # the head deadline, then close. It costs no memory (h11 drops the data).
            self._draining = True
            self._drain_timer = self.loop.call_later(self.header_timeout, self._drain_timed_out)

    def _drain_timed_out(self) -> None:
        self._drain_timer = None
        if self._draining and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        super().connection_lost(exc)


def uvicorn_config(app: Starlette, **kwargs: Any) -> Any:
    """A uvicorn.Config for `app` with the connection limits of its `Limits` (app.state.limits)."""
    import uvicorn

    limits: Limits = app.state.limits
    protocol = type("GuardedH11", (_GuardedH11,), {"header_timeout": float(limits.header_timeout),
                                                    "max_connections": limits.max_connections,
                                                    "max_header_bytes": limits.max_header_bytes})
    return uvicorn.Config(app, http=protocol, ws="none", lifespan="on", timeout_keep_alive=limits.keep_alive,
                          h11_max_incomplete_event_size=limits.max_header_bytes, **kwargs)


def bind_socket(host: str, port: int) -> socket.socket:
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
def serve_in_thread(app: Starlette, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Runs `app` under uvicorn in a background thread; yields its base URL, stops on exit.

    For tests, notebooks and benchmarks; port 0 picks a free port.
    """
    import uvicorn

    sock = bind_socket(host, port)
    server = uvicorn.Server(uvicorn_config(app, log_level="warning", access_log=False))
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
