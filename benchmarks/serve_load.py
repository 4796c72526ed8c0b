"""Load test of `hwrjax serve`: N requests of one digit photo each from C concurrent clients.

  python benchmarks/serve_load.py --workdir=runs/resnet                 # starts its own server
  python benchmarks/serve_load.py --url=http://127.0.0.1:8000 --requests=1000 --concurrency=8

With --workdir the program starts `hwrjax serve --port=0` on 127.0.0.1 as a subprocess
(so clients and server do not share a GIL), waits until it has compiled, and stops it
at the end. Only loopback addresses are accepted. Each request POSTs one of ten
synthetic photos of a printed digit (rendered by hwrjax.synth, ~340 px square PNG) to
/api/recognize?mode=digit. Reports errors, client-side latency percentiles, the
server's own latency_ms, and requests per second. The run stops after --requests
requests or --max_seconds, whichever comes first.
"""

from __future__ import annotations

import concurrent.futures
import io
import ipaddress
import json
import logging
import os
import subprocess
import sys
import threading
import time
import urllib.parse

import httpx
import numpy as np
from absl import app, flags
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hwrjax import synth  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "", "Start a server for this training workdir (else use --url).")
flags.DEFINE_string("url", "", "Base URL of a running server on this machine, e.g. http://127.0.0.1:8000.")
flags.DEFINE_integer("requests", 1000, "Timed requests in total.")
flags.DEFINE_integer("concurrency", 8, "Concurrent clients (threads, one keep-alive connection each).")
flags.DEFINE_enum("mode", "digit", ["digit", "number"], "Query mode sent to /api/recognize.")
flags.DEFINE_integer("warmup", 16, "Untimed requests sent first.")
flags.DEFINE_float("max_seconds", 600, "Stop sending after this long.")
flags.DEFINE_string("output", "", "Optional JSON file for the figures.")


def digit_photos(seed: int = 0) -> list[bytes]:
    """PNG photos of the digits 0-9: printed glyphs made MNIST-like, then rendered by synth."""
    rng = np.random.default_rng(seed)
    font = ImageFont.load_default(size=92)
    photos = []
    for d in range(10):
        im = Image.new("L", (112, 112), 0)
        ImageDraw.Draw(im).text((56, 56), str(d), fill=255, font=font, anchor="mm")
        digit28 = np.asarray(im.resize((28, 28), Image.Resampling.BOX))
        buf = io.BytesIO()
        Image.fromarray(synth.render_photo(digit28, rng)).save(buf, format="PNG")
        photos.append(buf.getvalue())
    return photos


def _check_loopback(url: str) -> None:
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = host == "localhost"
    if not ok:
        raise app.UsageError(f"--url must point at this machine (127.0.0.1, localhost or ::1), got {host!r}")


def start_server(workdir: str) -> tuple[subprocess.Popen, str]:
    """Starts `hwrjax serve` on a free 127.0.0.1 port; returns the process and its base URL."""
    cmd = [sys.executable, "-m", "hwrjax.cli", "serve", f"--workdir={workdir}", "--host=127.0.0.1", "--port=0",
           "--no-access-log"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 600
    for line in proc.stderr:
        if line.startswith("hwrjax serve: http://"):
            url = line.split()[2].rstrip("/")
            break
        if "error" in line.lower():
            sys.stderr.write(line)
        if time.monotonic() > deadline:
            break
    else:
        raise RuntimeError(f"the server exited with code {proc.wait()} before it was ready")
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # keep the pipe drained
    with httpx.Client(timeout=600) as c:  # health answers once warmup compilation is done
        c.get(url + "/api/health").raise_for_status()
    return proc, url


def run_load(url: str, photos: list[bytes]) -> dict:
    """Sends the requests; returns the figures."""
    endpoint = f"{url}/api/recognize?mode={FLAGS.mode}"
    with httpx.Client(timeout=60) as c:
        for i in range(FLAGS.warmup):
            c.post(endpoint, content=photos[i % len(photos)])

    lock = threading.Lock()
    next_index = [0]
    deadline = time.monotonic() + FLAGS.max_seconds
    latencies, server_ms, errors = [], [], []

    def client() -> None:
        with httpx.Client(timeout=60) as c:
            while time.monotonic() < deadline:
                with lock:
                    i = next_index[0]
                    if i >= FLAGS.requests:
                        return
                    next_index[0] += 1
                t0 = time.perf_counter()
                try:
                    r = c.post(endpoint, content=photos[i % len(photos)])
                    ok = r.status_code == 200
                    body = r.json()
                except (httpx.HTTPError, ValueError) as e:
                    ok, body = False, {"error": repr(e)}
                elapsed = (time.perf_counter() - t0) * 1e3
                with lock:
                    latencies.append(elapsed)
                    if ok and len(body.get("digits", [])) == 1:
                        server_ms.append(body["latency_ms"])
                    else:
                        errors.append(body.get("error", f"unexpected reply {body}"))

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(FLAGS.concurrency) as pool:
        for f in [pool.submit(client) for _ in range(FLAGS.concurrency)]:
            f.result()
    wall = time.perf_counter() - start
    lat = np.asarray(latencies)
    pct = lambda a, q: round(float(np.percentile(a, q)), 2) if len(a) else None  # noqa: E731
    return {"requests": len(latencies), "concurrency": FLAGS.concurrency, "errors": len(errors),
            "first_errors": errors[:3], "p50_ms": pct(lat, 50), "p90_ms": pct(lat, 90), "p99_ms": pct(lat, 99),
            "max_ms": pct(lat, 100), "server_p50_ms": pct(server_ms, 50), "server_p99_ms": pct(server_ms, 99),
            "requests_per_s": round(len(latencies) / wall, 1), "wall_s": round(wall, 1)}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if bool(FLAGS.workdir) == bool(FLAGS.url):
        raise app.UsageError("pass exactly one of --workdir (start a server) and --url (use a running one)")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no log line per request
    photos = digit_photos()
    proc = None
    try:
        if FLAGS.workdir:
            proc, url = start_server(FLAGS.workdir)
        else:
            url = FLAGS.url.rstrip("/")
            _check_loopback(url)
        figures = {"url": url, "mode": FLAGS.mode, "image_bytes": int(np.mean([len(p) for p in photos])),
                   **run_load(url, photos)}
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(json.dumps(figures, indent=1))
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    app.run(main)
