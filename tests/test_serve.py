"""Tests for hwrjax.serve: the JSON API, upload limits, errors, and concurrency.

The app runs under a real uvicorn on a free 127.0.0.1 port (in a thread); raw ASGI calls
check that oversized bodies are refused before they are read. The model is untrained:
results are compared with the Recognizer's own reading of the same bytes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import time

import httpx
import numpy as np
import pytest

from hwrjax.recognize import Recognizer
from hwrjax.serve import create_app, serve_in_thread
from test_recognize import draw_digit, drawn_number, png_bytes, shared_untrained_workdir

LIMIT = 200_000


@pytest.fixture(scope="module")
def recognizer(tmp_path_factory):
    rec = Recognizer.from_workdir(shared_untrained_workdir(tmp_path_factory))
    rec.warmup(4)
    return rec


@pytest.fixture(scope="module")
def client(recognizer):
    with serve_in_thread(create_app(recognizer, max_upload_bytes=LIMIT)) as url:
        with httpx.Client(base_url=url, timeout=60) as c:
            yield c


@pytest.fixture(scope="module")
def number_png():
    return png_bytes(drawn_number([4, 0, 7]))


def test_health_and_page(client):
    r = client.get("/api/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "model": "resnet", "step": 0}
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for needle in ('id="pad"', 'id="result"', 'id="clear"', 'value="digit"', 'value="number"', "pointerdown"):
        assert needle in page.text
    assert "http://" not in page.text and "https://" not in page.text  # self-contained: no CDN


def test_recognize_raw_png(client, recognizer, number_png):
    r = client.post("/api/recognize", content=number_png, headers={"content-type": "image/png"})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"text", "digits", "probabilities", "latency_ms"}
    want = recognizer.read(number_png)
    assert body["text"] == want.text and len(body["digits"]) == 3
    assert body["digits"] == want.digits
    np.testing.assert_allclose(body["probabilities"], want.probabilities, atol=1e-6)
    assert body["latency_ms"] > 0


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
             "root_path": "", "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body), pulled


def test_oversized_bodies_are_refused_before_reading_them(recognizer):
    app = create_app(recognizer, max_upload_bytes=LIMIT)
    chunks = [b"\0" * 50_000] * 100  # 5 MB, streamed without Content-Length
    status, body, pulled = _call_app(app, [(b"content-type", b"image/png")], chunks)
    assert status == 413 and "limit" in body["error"]
    assert pulled <= LIMIT // 50_000 + 1
    # A declared Content-Length over the limit is refused without reading any of the body.
    status, _, pulled = _call_app(app, [(b"content-length", b"1000000000")], chunks)
    assert (status, pulled) == (413, 0)


def test_real_server_concurrent_requests_and_errors(recognizer, number_png):
    good = [png_bytes(draw_digit(d)) for d in (0, 1, 4, 7)] + [number_png]
    expected = {body: recognizer.read(body).text for body in good}
    jobs = [(good[i % len(good)], 200) for i in range(30)] + [(b"junk %d" % i, 400) for i in range(6)]
    with serve_in_thread(create_app(recognizer, max_upload_bytes=LIMIT)) as url:
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
    release = threading.Event()
    read = recognizer.read

    def slow_read(data, mode="number"):
        release.wait(timeout=30)
        return read(data, mode)

    monkeypatch.setattr(recognizer, "read", slow_read)
    with serve_in_thread(create_app(recognizer)) as url:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, url + "/api/recognize", content=number_png, timeout=60)
            time.sleep(0.3)  # the slow request is now waiting inside a worker thread
            t0 = time.perf_counter()
            assert httpx.get(url + "/api/health", timeout=10).status_code == 200
            assert time.perf_counter() - t0 < 2.0
            assert not pending.done()
            release.set()
            assert pending.result().status_code == 200
