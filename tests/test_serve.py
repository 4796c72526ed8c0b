"""Tests for hwrjax.apps.serve: the JSON API, upload limits, errors, who may call, batching and connections.

Most tests drive the app in-process through httpx's ASGI transport (or raw ASGI calls, to
count how much of a body the app pulled); a real uvicorn on a free 127.0.0.1 port (bound
to port 0, so no race) is used where the transport matters: concurrency and connection
timeouts. The model is untrained: results are compared with the Recognizer's own reading
of the same bytes. Blocking is made deterministic with events, never with sleeps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import socket
import struct
import threading
import time
import urllib.parse
import zlib

import httpx
import numpy as np
import pytest

from hwrjax.apps.recognize import Recognizer
from hwrjax.apps.serve import Limits, MicroBatcher, create_app, serve_in_thread
from test_recognize import draw_digit, drawn_number, png_bytes, shared_untrained_workdir

LIMIT = 200_000
LOCAL = "http://127.0.0.1:8000"  # base URL of in-process requests: a Host the app accepts


@pytest.fixture(scope="module")
def recognizer(tmp_path_factory):
    rec = Recognizer.from_workdir(shared_untrained_workdir(tmp_path_factory))
    rec.warmup(16)
    return rec


@pytest.fixture(scope="module")
def client(recognizer):
    with serve_in_thread(create_app(recognizer, Limits(max_upload_bytes=LIMIT))) as url:
        with httpx.Client(base_url=url, timeout=60) as c:
            yield c


@pytest.fixture(scope="module")
def number_png():
    return png_bytes(drawn_number([4, 0, 7]))


def asgi_requests(app, *requests):
    """Sends (method, path, kwargs) requests to `app` in-process, one after another; returns the responses."""
    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=LOCAL) as c:
            return [await c.request(method, path, **kwargs) for method, path, kwargs in requests]
    return asyncio.run(run())


class Blocked:
    """Wraps a callable so that calls wait for `release`; `entered` counts calls that started."""

    def __init__(self, fn, block_calls: int = 1):
        self.fn, self.block_calls = fn, block_calls
        self.calls = 0
        self.entered = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, *args, **kwargs):
        with self._lock:
            self.calls += 1
            block = self.calls <= self.block_calls
        if block:
            self.entered.set()
            assert self.release.wait(60), "the test never released the blocked call"
        return self.fn(*args, **kwargs)


def test_health_and_page(client):
    r = client.get("/api/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "model": "resnet", "step": 0, "temperature": 1.0, "calibrated": False,
                        "min_confidence": 0.0}
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for needle in ('id="pad"', 'id="result"', 'id="clear"', 'value="digit"', 'value="number"', "pointerdown",
                   'id="min-confidence"', "min_confidence="):
        assert needle in page.text
    assert "http://" not in page.text and "https://" not in page.text  # self-contained: no CDN


def test_recognize_raw_png(client, recognizer, number_png):
    r = client.post("/api/recognize", content=number_png, headers={"content-type": "image/png"})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"text", "digits", "probabilities", "unsure", "min_confidence", "latency_ms"}
    want = recognizer.read(number_png)
    assert body["text"] == want.text and len(body["digits"]) == 3
    assert body["digits"] == want.digits
    np.testing.assert_allclose(body["probabilities"], want.probabilities, atol=1e-6)
    assert body["latency_ms"] > 0


def test_min_confidence_marks_unsure_answers(client, recognizer, number_png):
    least = recognizer.read(number_png).probability
    for threshold, unsure in ((0.0, False), (least, False), (min(1.0, least + 1e-3), True), (1.0, True)):
        r = client.post(f"/api/recognize?min_confidence={threshold}", content=number_png)
        assert r.status_code == 200
        body = r.json()
        assert body["unsure"] is unsure and body["min_confidence"] == threshold
        assert len(body["digits"]) == 3  # the digits are still given
    assert client.post("/api/recognize", content=number_png).json()["unsure"] is False  # the server's default: 0
    for bad in ("1.5", "-0.1", "nan", "x"):
        r = client.post(f"/api/recognize?min_confidence={bad}", content=number_png)
        assert r.status_code == 400 and "min_confidence" in r.json()["error"]


def test_recognize_multipart_and_modes(client, number_png):
    raw = client.post("/api/recognize", content=number_png).json()
    form = client.post("/api/recognize", files={"image": ("n.png", number_png, "image/png")})
    assert form.status_code == 200 and form.json()["text"] == raw["text"]
    digit = client.post("/api/recognize?mode=digit", content=number_png)
    assert digit.status_code == 200 and len(digit.json()["digits"]) == 1
    single = client.post("/api/recognize?mode=number", content=png_bytes(draw_digit(7)))
    assert len(single.json()["digits"]) == 1
    bad = client.post("/api/recognize?mode=letters", content=number_png)
    assert bad.status_code == 400 and "mode" in bad.json()["error"]
    wrong_field = client.post("/api/recognize", files={"file": ("n.png", number_png, "image/png")})
    assert wrong_field.status_code == 400 and "'image'" in wrong_field.json()["error"]
    garbled = client.post("/api/recognize", content=b"garbage", headers={"content-type": "multipart/form-data"})
    assert garbled.status_code == 400 and "multipart" in garbled.json()["error"]


@pytest.mark.parametrize("body, needle", [
    (b"hello, I am text", "not an image"),
    (b"", "empty"),
    (png_bytes(np.full((80, 120), 255, np.uint8)), "no ink"),
    (b"\x89PNG\r\n\x1a\n truncated", "image"),
])
def test_bad_uploads_are_400_json(client, body, needle):
    r = client.post("/api/recognize", content=body)
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/json"
    assert needle in r.json()["error"]


def test_large_images_take_the_slow_lane_and_read_the_same(recognizer):
    """Images over LIGHT_PIXELS or LIGHT_SIDE are read in the slow lane's process, as a direct read would."""
    from hwrjax.apps.serve import LIGHT_PIXELS

    big = np.full((600, 600), 255, np.uint8)
    big[150:450, 280:320] = 0  # a thick "1"
    assert big.size > LIGHT_PIXELS
    data = png_bytes(big)
    app = create_app(recognizer)
    try:
        r, small = asgi_requests(app, ("POST", "/api/recognize", {"content": data}),
                                 ("POST", "/api/recognize", {"content": png_bytes(draw_digit(7))}))
        assert r.status_code == 200 and small.status_code == 200, r.text
        assert r.json()["text"] == recognizer.read(data).text
        assert app.state.lanes.slow.reads == 1  # the large one only
        strip = np.full((2000, 3), 255, np.uint8)  # few pixels, but a long side (issue 18's thin line)
        strip[50:1950, 1] = 0
        (thin,) = asgi_requests(app, ("POST", "/api/recognize", {"content": png_bytes(strip)}))
        assert thin.status_code in (200, 400), thin.text
        assert app.state.lanes.slow.reads == 2
        # A decompression bomb is refused from its header in the fast lane: no trip to the slow one.
        bomb = png_bytes(np.zeros((1, 1), np.uint8))
        bomb = bomb[:16] + struct.pack(">II", 30000, 30000) + bomb[24:29] + struct.pack(
            ">I", zlib.crc32(bomb[12:16] + struct.pack(">II", 30000, 30000) + bomb[24:29])) + bomb[33:]
        (refused,) = asgi_requests(app, ("POST", "/api/recognize", {"content": bomb}))
        assert refused.status_code == 400 and "pixels" in refused.json()["error"]
        assert app.state.lanes.slow.reads == 2
    finally:
        app.state.lanes.close()


def test_the_slow_lane_survives_images_over_its_time_and_memory(recognizer):
    app = create_app(recognizer, Limits(slow_memory_mb=64))
    slow = app.state.lanes.slow
    big = np.full((600, 600), 255, np.uint8)
    big[150:450, 280:320] = 0
    huge = png_bytes(np.full((6000, 6000, 4), 255, np.uint8))  # 144 MB once decoded
    try:
        (r,) = asgi_requests(app, ("POST", "/api/recognize", {"content": huge}))
        assert r.status_code == 400, r.text
        slow.start()
        first_worker = slow._proc.pid
        slow.timeout = 0.0  # no image can be read in no time: the worker is killed and replaced
        (late,) = asgi_requests(app, ("POST", "/api/recognize", {"content": png_bytes(big)}))
        assert late.status_code == 400 and "took over" in late.json()["error"]
        assert slow._proc is None
        slow.timeout = 60.0
        (ok,) = asgi_requests(app, ("POST", "/api/recognize", {"content": png_bytes(big)}))
        assert ok.status_code == 200, ok.text
        assert slow._proc.pid != first_worker
    finally:
        app.state.lanes.close()


def test_oversized_uploads_are_413(client, number_png):
    big = b"\x89PNG" + b"\0" * (LIMIT + 10)
    r = client.post("/api/recognize", content=big)
    assert r.status_code == 413 and "limit" in r.json()["error"]
    form = client.post("/api/recognize", files={"image": ("big.png", big, "image/png")})
    assert form.status_code == 413
    assert client.post("/api/recognize", content=number_png).status_code == 200  # still serving


def test_unknown_routes_are_json(client):
    assert client.get("/nope").json() == {"error": "Not Found"}
    r = client.get("/api/recognize")
    assert r.status_code == 405 and "error" in r.json()


def _call_app(app, headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> tuple[int, dict, int]:
    """Runs one raw ASGI request; returns (status, json body, number of body chunks the app pulled)."""
    pulled = 0
    sent: list[dict] = []

    async def receive():
        nonlocal pulled
        if pulled >= len(chunks):
            return {"type": "http.disconnect"}
        pulled += 1
        return {"type": "http.request", "body": chunks[pulled - 1], "more_body": pulled < len(chunks)}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/api/recognize", "raw_path": b"/api/recognize", "query_string": b"",
             "root_path": "", "headers": [(b"host", b"127.0.0.1:8000"), *headers], "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 8000)}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body), pulled


def test_oversized_bodies_are_refused_before_reading_them(recognizer):
    app = create_app(recognizer, Limits(max_upload_bytes=LIMIT))
    chunks = [b"\0" * 50_000] * 100  # 5 MB, streamed without Content-Length
    status, body, pulled = _call_app(app, [(b"content-type", b"image/png")], chunks)
    assert status == 413 and "limit" in body["error"]
    assert pulled <= LIMIT // 50_000 + 1
    # A declared Content-Length over the limit is refused without reading any of the body.
    status, _, pulled = _call_app(app, [(b"content-length", b"1000000000")], chunks)
    assert (status, pulled) == (413, 0)


# ---------------------------------------------------------------- who may call


def test_foreign_host_is_refused_before_any_work(recognizer, number_png):
    app = create_app(recognizer)
    spy = Blocked(recognizer.prepare, block_calls=0)
    recognizer.prepare = spy
    try:
        responses = asgi_requests(
            app,
            ("POST", "/api/recognize", {"content": number_png, "headers": {"host": "evil.example"}}),
            ("GET", "/api/health", {"headers": {"host": "evil.example:8000"}}),  # DNS rebinding: a name of theirs
            ("GET", "/", {"headers": {"host": "127.0.0.1.evil.example"}}),
            ("GET", "/api/health", {"headers": {"host": "localhost:8000"}}),
            ("GET", "/api/health", {"headers": {"host": "[::1]:8000"}}),
        )
    finally:
        del recognizer.prepare
    assert [r.status_code for r in responses] == [403, 403, 403, 200, 200]
    assert "--allow-host" in responses[0].json()["error"]
    assert spy.calls == 0

    named = create_app(recognizer, host="192.0.2.7", allow_hosts=["digits.example"])
    ok, other, loop = asgi_requests(named, ("GET", "/api/health", {"headers": {"host": "digits.example"}}),
                                    ("GET", "/api/health", {"headers": {"host": "192.0.2.8"}}),
                                    ("GET", "/api/health", {"headers": {"host": "localhost"}}))
    assert (ok.status_code, other.status_code, loop.status_code) == (200, 403, 403)


def test_cross_origin_posts_are_refused(recognizer, number_png):
    app = create_app(recognizer)
    spy = Blocked(recognizer.prepare, block_calls=0)
    recognizer.prepare = spy
    try:
        text_plain, no_origin_cross, preflight, same_origin = asgi_requests(
            app,
            # The "simple request" a foreign page can send without a preflight.
            ("POST", "/api/recognize", {"content": number_png, "headers": {
                "origin": "https://evil.example", "content-type": "text/plain", "sec-fetch-site": "cross-site"}}),
            ("POST", "/api/recognize", {"content": number_png, "headers": {"sec-fetch-site": "cross-site"}}),
            ("OPTIONS", "/api/recognize", {"headers": {"origin": "https://evil.example",
                                                       "access-control-request-method": "POST"}}),
            # The drawing page: same origin (browsers send Origin with every POST).
            ("POST", "/api/recognize", {"content": number_png, "headers": {
                "origin": LOCAL, "content-type": "image/png", "sec-fetch-site": "same-origin"}}),
        )
    finally:
        del recognizer.prepare
    assert text_plain.status_code == 403 and "--allow-origin" in text_plain.json()["error"]
    assert no_origin_cross.status_code == 403
    assert preflight.status_code == 403 and "access-control-allow-origin" not in preflight.headers
    assert same_origin.status_code == 200 and "access-control-allow-origin" not in same_origin.headers
    assert spy.calls == 1  # only the same-origin request was read


def test_allowed_origin_gets_cors(recognizer, number_png):
    origin = "https://digits.example"
    app = create_app(recognizer, allow_origins=[origin])
    preflight, post, other = asgi_requests(
        app,
        ("OPTIONS", "/api/recognize", {"headers": {"origin": origin, "access-control-request-method": "POST",
                                                   "access-control-request-headers": "content-type"}}),
        ("POST", "/api/recognize?mode=digit", {"content": number_png, "headers": {
            "origin": origin, "content-type": "text/plain", "sec-fetch-site": "cross-site"}}),
        ("POST", "/api/recognize", {"content": number_png, "headers": {"origin": "https://other.example"}}),
    )
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == origin
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "content-type" in preflight.headers["access-control-allow-headers"].lower()
    assert post.status_code == 200 and post.headers["access-control-allow-origin"] == origin
    assert len(post.json()["digits"]) == 1
    assert other.status_code == 403
    with pytest.raises(ValueError, match="scheme://host"):
        create_app(recognizer, allow_origins=["digits.example"])


# ---------------------------------------------------------------- limits


def test_requests_beyond_the_in_flight_limit_get_a_prompt_503(recognizer, number_png, monkeypatch):
    blocked = Blocked(recognizer.prepare)
    monkeypatch.setattr(recognizer, "prepare", blocked)
    app = create_app(recognizer, Limits(max_in_flight=1))

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=LOCAL) as c:
            first = asyncio.create_task(c.post("/api/recognize", content=number_png))
            assert await asyncio.to_thread(blocked.entered.wait, 60)  # the first reading is now in flight
            second = await c.post("/api/recognize", content=number_png)
            health = await c.get("/api/health")
            blocked.release.set()
            return await first, second, health, await c.post("/api/recognize", content=number_png)

    first, second, health, third = asyncio.run(run())
    assert second.status_code == 503 and second.headers["retry-after"] == "1"
    assert "busy" in second.json()["error"]
    assert health.status_code == 200  # only readings count
    assert first.status_code == 200 and third.status_code == 200
    assert blocked.calls == 2  # the refused request was never preprocessed


def test_batched_readings_equal_single_readings(recognizer, number_png, monkeypatch):
    images = [png_bytes(draw_digit(d)) for d in (0, 1, 4, 7)] + [number_png, png_bytes(drawn_number([1, 7]))]
    want = [recognizer.read(data) for data in images]
    classify = Blocked(recognizer.classify)
    monkeypatch.setattr(recognizer, "classify", classify)
    app = create_app(recognizer, Limits(workers=2))
    batcher: MicroBatcher = app.state.batcher

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=LOCAL) as c:
            # The first reading holds the model; the others queue up behind it and go in one call.
            first = asyncio.create_task(c.post("/api/recognize", content=images[0]))
            assert await asyncio.to_thread(classify.entered.wait, 60)
            rest = [asyncio.create_task(c.post("/api/recognize", content=data)) for data in images[1:]]
            while batcher.waiting() < len(rest):
                await asyncio.sleep(0.01)
            classify.release.set()
            return [await first] + [await r for r in rest]

    got = asyncio.run(run())
    assert batcher.batch_sizes == [1, sum(len(w.digits) for w in want[1:])]
    assert classify.calls == 2
    for r, w in zip(got, want):
        assert r.status_code == 200, r.text
        assert r.json()["digits"] == w.digits
        np.testing.assert_allclose(r.json()["probabilities"], w.probabilities, rtol=1e-5, atol=1e-6)


def test_micro_batcher_bounds(recognizer):
    with pytest.raises(ValueError, match="one number's digits"):
        MicroBatcher(recognizer, recognizer.max_digits - 1)
    batcher = MicroBatcher(recognizer, 16)
    with pytest.raises(ValueError, match="1..16 crops"):
        batcher.submit(np.zeros((17, 28, 28), np.float32))
    crops = np.stack([draw_digit(d).astype(np.float32) / 255 for d in (0, 1, 4)])
    np.testing.assert_allclose(batcher.submit(crops).result(60), recognizer.classify(crops), rtol=1e-5, atol=1e-6)
    batcher.close()


@pytest.mark.parametrize("field, value", [("max_in_flight", 0), ("workers", -1), ("max_batch", 12),
                                          ("body_timeout", float("nan")), ("keep_alive", 0), ("max_batch", True)])
def test_limits_are_checked(field, value):
    with pytest.raises(ValueError, match=field):
        Limits(**{field: value})


# ---------------------------------------------------------------- a real server


def test_real_server_concurrent_requests_and_errors(recognizer, number_png):
    good = [png_bytes(draw_digit(d)) for d in (0, 1, 4, 7)] + [number_png]
    expected = {body: recognizer.read(body).text for body in good}
    jobs = [(good[i % len(good)], 200) for i in range(30)] + [(b"junk %d" % i, 400) for i in range(6)]
    with serve_in_thread(create_app(recognizer, Limits(max_upload_bytes=LIMIT))) as url:
        def post(job):
            body, want = job
            with httpx.Client(base_url=url, timeout=60) as c:
                r = c.post("/api/recognize", content=body)
            assert r.status_code == want, r.text
            return body, r.json()

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(post, jobs))
        for body, result in results:
            if body in expected:
                assert result["text"] == expected[body]
            else:
                assert "error" in result
        with httpx.Client(base_url=url, timeout=60) as c:
            huge = c.post("/api/recognize", content=b"\0" * (20 * LIMIT))
            assert huge.status_code == 413
            assert c.get("/api/health").json()["status"] == "ok"
            assert c.post("/api/recognize", content=number_png).json()["text"] == expected[number_png]


def test_inference_does_not_block_the_event_loop(recognizer, number_png, monkeypatch):
    blocked = Blocked(recognizer.prepare)
    monkeypatch.setattr(recognizer, "prepare", blocked)
    with serve_in_thread(create_app(recognizer)) as url:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, url + "/api/recognize", content=number_png, timeout=60)
            assert blocked.entered.wait(60)  # the slow request is now waiting inside a worker thread
            assert httpx.get(url + "/api/health", timeout=30).status_code == 200
            assert not pending.done()
            blocked.release.set()
            assert pending.result().status_code == 200


def _connect(url: str) -> socket.socket:
    parts = urllib.parse.urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=60)
    return sock


def _closed_by_server(sock: socket.socket, trickle: bytes = b"") -> bool:
    """Waits (sending `trickle` a byte at a time, if given) until the server closes; False after 60 s."""
    sock.settimeout(0.1 if trickle else 60)
    for i in range(600 if trickle else 1):
        if trickle:
            try:
                sock.sendall(trickle[i % len(trickle):i % len(trickle) + 1])
            except OSError:
                return True  # reset by the server
        try:
            while True:
                data = sock.recv(4096)
                if not data:
                    return True
        except socket.timeout:
            continue
        except OSError:
            return True
    return False


def test_idle_and_slow_connections_are_closed_by_the_server(recognizer):
    limits = Limits(header_timeout=0.5, keep_alive=0.3, body_timeout=0.5)
    with serve_in_thread(create_app(recognizer, limits)) as url:
        host = urllib.parse.urlsplit(url).netloc.encode()
        with _connect(url) as idle:  # connects and never sends a byte
            assert _closed_by_server(idle)
        with _connect(url) as slowloris:  # sends a request head one byte at a time, forever
            assert _closed_by_server(slowloris, trickle=b"GET /api/health HTTP/1.1\r\nX-Pad: " + b"a" * 10_000)
        with _connect(url) as kept:  # one answered request, then silence on the kept-alive connection
            kept.sendall(b"GET /api/health HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
            assert b"200 OK" in kept.recv(4096)
            assert _closed_by_server(kept)
        with _connect(url) as slow_body:  # a head announcing a body that never comes: 408, then closed
            slow_body.sendall(b"POST /api/recognize HTTP/1.1\r\nHost: " + host +
                              b"\r\nContent-Type: image/png\r\nContent-Length: 5000\r\n\r\n\x89PNG")
            slow_body.settimeout(60)
            reply = b""
            while chunk := slow_body.recv(4096):
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 408") and b"upload took over" in reply
        with _connect(url) as big_head:  # a head over max_header_bytes, in one read: 431, then closed
            big_head.sendall(b"GET /api/health HTTP/1.1\r\nHost: " + host + b"\r\nX-Pad: " +
                             b"a" * (limits.max_header_bytes + 1000) + b"\r\n\r\n")
            big_head.settimeout(60)
            reply = b""
            while chunk := big_head.recv(4096):
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 431")
        with httpx.Client(base_url=url, timeout=60) as c:  # and it still serves
            assert c.get("/api/health").status_code == 200


def test_connections_beyond_the_cap_evict_the_longest_idle(recognizer, number_png, monkeypatch):
    blocked = Blocked(recognizer.prepare, block_calls=2)
    monkeypatch.setattr(recognizer, "prepare", blocked)
    with serve_in_thread(create_app(recognizer, Limits(max_connections=2, header_timeout=60, keep_alive=60))) as url:
        host = urllib.parse.urlsplit(url).netloc.encode()
        request = b"GET /api/health HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
        older, newer = _connect(url), _connect(url)
        for sock in (older, newer):  # one answered request each: both now wait for their next one
            sock.sendall(request)
            assert b"200 OK" in sock.recv(4096)
        with _connect(url) as third, older, newer:
            third.sendall(request)
            assert b"200 OK" in third.recv(4096)
            assert _closed_by_server(older)  # evicted: it had waited longest
            newer.sendall(request)
            assert b"200 OK" in newer.recv(4096)

    # When every open connection is busy with a request, a new one is closed at once. (A server of
    # its own: closed connections of the part above must not linger in its count.)
    with serve_in_thread(create_app(recognizer, Limits(max_connections=2, header_timeout=60, keep_alive=60))) as url:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            pending = [pool.submit(httpx.post, url + "/api/recognize", content=number_png, timeout=60)
                       for _ in range(2)]
            deadline = time.monotonic() + 60
            while blocked.calls < 2:
                assert time.monotonic() < deadline, "the two readings never started"
                time.sleep(0.01)
            with _connect(url) as extra:
                assert _closed_by_server(extra)
            blocked.release.set()
            assert [p.result().status_code for p in pending] == [200, 200]


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Reads one HTTP response with a Content-Length from `sock`; returns (status, body)."""
    sock.settimeout(60)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"closed before a full response head: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    while len(body) < length:
        chunk = sock.recv(4096)
        assert chunk, "closed before the full response body"
        body += chunk
    return int(head.split()[1]), body


def test_a_refused_upload_is_drained_within_bounds(recognizer):
    """An upload answered before it is read (413) is read and dropped, so the client sees the answer
    and the connection serves again; a body still coming at the head deadline gets the connection closed."""
    # The deadline must leave this (possibly busy) machine time to send 2 MB; the second part waits it out.
    with serve_in_thread(create_app(recognizer, Limits(max_upload_bytes=LIMIT, header_timeout=5))) as url:
        host = urllib.parse.urlsplit(url).netloc.encode()
        with _connect(url) as sock:
            size = 10 * LIMIT
            sock.sendall(b"POST /api/recognize HTTP/1.1\r\nHost: " + host +
                         b"\r\nContent-Length: %d\r\n\r\n" % size)
            status, body = _read_response(sock)
            assert status == 413 and b"limit" in body
            sock.sendall(b"\0" * size)  # the client goes on sending what it announced
            sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
            assert _read_response(sock)[0] == 200
        with _connect(url) as sock:
            sock.sendall(b"POST /api/recognize HTTP/1.1\r\nHost: " + host +
                         b"\r\nContent-Length: %d\r\n\r\n" % (10**12))
            assert _read_response(sock)[0] == 413
            assert _closed_by_server(sock, trickle=b"\0")  # a body without end: dropped until the deadline
