"""Load test of `hwrjax serve`: latency and throughput for 1 and 8 clients, quiet and under attack.

  python benchmarks/serve_load.py --workdir=runs/resnet                   # 1 then 8 clients, quiet
  python benchmarks/serve_load.py --workdir=runs/resnet --hostile         # each also under attack
  python benchmarks/serve_load.py --url=http://127.0.0.1:8000 --concurrency=8 --requests=2000

With --workdir the program starts `hwrjax serve --port=0` on 127.0.0.1 as a subprocess
(so clients and server do not share a GIL), waits until it has compiled, and stops it
at the end. Only loopback addresses are accepted. Each client is a thread with one
keep-alive connection sending requests back to back.

--images=drawing (default) sends what the drawing page sends: a digit drawn with the
page's pen on its 640x256 canvas, downscaled as the page does (hwrjax/apps/static/index.html,
UPLOAD_SCALE) to a 160x64 PNG, in the page's default mode (number). --images=photo sends
~340 px synthetic photos of printed digits (tests.support.synth) instead.

--hostile repeats each phase while attackers run alongside the normal clients:
  * --bombs threads each POST, back to back, one of: a decompression bomb (a 30000x30000
    PNG of a few KB), a plain 6300x6300 RGBA PNG under the pixel limit, and a 2x5000 PNG
    holding one 1-px line (thin-stroke thickening);
  * --slowloris connections each sending a request head one byte every 0.5 s, reopened
    when the server closes them;
  * --idle connections opened and left silent, reopened when closed.
The attackers run in a process of their own at nice 10 (a real attacker is not on the server's
cores). It reports the normal clients' figures quiet and hostile side by side, with the p99 ratio;
--rounds interleaves quiet and hostile phases and the table gives medians over the rounds.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import io
import ipaddress
import json
import logging
import multiprocessing
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import zlib
from typing import Any

import httpx
import numpy as np
from absl import app, flags
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.support import synth  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "", "Start a server for this training workdir (else use --url).")
flags.DEFINE_string("url", "", "Base URL of a running server on this machine, e.g. http://127.0.0.1:8000.")
flags.DEFINE_list("concurrency", ["1", "8"], "Concurrent clients of each phase, run one after another.")
flags.DEFINE_integer("requests", 1000, "Timed requests per phase.")
flags.DEFINE_integer("rounds", 3, "Rounds of all phases (quiet and hostile interleaved); the table shows medians.")
flags.DEFINE_enum("images", "drawing", ["drawing", "photo"], "What the clients send (see the module docstring).")
flags.DEFINE_enum("mode", "number", ["digit", "number"], "Query mode sent to /api/recognize.")
flags.DEFINE_integer("warmup", 32, "Untimed requests sent before each phase.")
flags.DEFINE_float("max_seconds", 300, "Stop a phase after this long.")
flags.DEFINE_bool("hostile", False, "Also run each phase under attack and compare.")
flags.DEFINE_integer("bombs", 2, "Attacker threads posting hostile images (with --hostile).")
flags.DEFINE_multi_enum("hostile_images", ["bomb", "huge", "line"], ["bomb", "huge", "line"],
                        "Which hostile images the attackers send (with --hostile).")
flags.DEFINE_integer("slowloris", 50, "Connections trickling a request head (with --hostile).")
flags.DEFINE_integer("idle", 200, "Silent connections held open (with --hostile).")
flags.DEFINE_list("server_flags", [], "Extra flags for `hwrjax serve` (with --workdir), e.g. --max-batch=32.")
flags.DEFINE_string("output", "", "Optional JSON file for the figures.")

CANVAS = (640, 256)  # the page's canvas (width, height) and pen width, as in hwrjax/apps/static/index.html
PEN = 16
UPLOAD_SCALE = 4


def page_drawings(seed: int = 0) -> list[bytes]:
    """PNGs of the digits 0-9 as the page uploads them: drawn with its pen, downscaled by UPLOAD_SCALE."""
    rng = np.random.default_rng(seed)
    drawings = []
    for d in range(10):
        size = int(rng.integers(150, 230))
        glyph = Image.new("L", (size, size), 0)
        font = ImageFont.load_default(size=size)
        ImageDraw.Draw(glyph).text((size // 2, size // 2), str(d), fill=255, font=font, anchor="mm")
        # Keep the glyph's skeleton-ish centre line and redraw it with the page's round pen.
        ys, xs = np.nonzero(np.asarray(glyph) > 128)
        canvas = Image.new("L", CANVAS, 255)
        draw = ImageDraw.Draw(canvas)
        x0 = int(rng.integers(PEN, CANVAS[0] - size - PEN))
        y0 = int(rng.integers(0, max(1, CANVAS[1] - size)))
        keep = rng.random(len(xs)) < 0.02
        for x, y in zip(xs[keep], ys[keep]):
            draw.ellipse((x0 + x - PEN / 2, y0 + y - PEN / 2, x0 + x + PEN / 2, y0 + y + PEN / 2), fill=17)
        small = canvas.resize((CANVAS[0] // UPLOAD_SCALE, CANVAS[1] // UPLOAD_SCALE), Image.Resampling.BILINEAR,
                              reducing_gap=None)
        buf = io.BytesIO()
        small.save(buf, format="PNG")
        drawings.append(buf.getvalue())
    return drawings


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


def _png(width: int, height: int, color_type: int, bit_depth: int, rows: bytes) -> bytes:
    """A PNG of the given header holding the (filter-byte prefixed) `rows`, compressed at level 9."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")


def hostile_images(kinds: list[str]) -> list[bytes]:
    """Of `kinds`: a decompression bomb, a huge plain image under the pixel limit, a long 1-px line."""
    images = []
    if "bomb" in kinds:
        images.append(_png(30000, 30000, 0, 1, (b"\0" + b"\0" * (30000 // 8)) * 30000))
    if "huge" in kinds:
        images.append(_png(6300, 6300, 6, 8, (b"\0" + b"\xff" * (6300 * 4)) * 6300))
    if "line" in kinds:
        line = np.full((5000, 2), 255, np.uint8)
        line[100:4900, 0] = 0
        buf = io.BytesIO()
        Image.fromarray(line).save(buf, format="PNG")
        images.append(buf.getvalue())
    return images


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
           "--no-access-log", *FLAGS.server_flags]
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


def _cpu_seconds(pid: int | None) -> float | None:
    """CPU time (user + system) used so far by process `pid` (Linux /proc), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(a: list[float], q: float) -> float | None:
    return round(float(np.percentile(a, q)), 2) if len(a) else None


def run_phase(url: str, images: list[bytes], concurrency: int, server_pid: int | None) -> dict:
    """`concurrency` clients send FLAGS.requests requests in all; returns the figures.

    CPU time per reading (server and these clients) is reported too: on a machine shared with
    other work it tells what the service costs whatever share of the cores it got.
    """
    endpoint = f"{url}/api/recognize?mode={FLAGS.mode}"
    with httpx.Client(timeout=60) as c:
        for i in range(FLAGS.warmup):
            c.post(endpoint, content=images[i % len(images)])

    lock = threading.Lock()
    next_index = [0]
    deadline = time.monotonic() + FLAGS.max_seconds
    latencies, server_ms, errors = [], [], []

    parts = urllib.parse.urlsplit(url)
    path = f"/api/recognize?mode={FLAGS.mode}"

    def client() -> None:
        # The standard library's client: a fraction of httpx's CPU time per request, which matters
        # when the clients share the server's two cores.
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        try:
            while time.monotonic() < deadline:
                with lock:
                    i = next_index[0]
                    if i >= FLAGS.requests:
                        return
                    next_index[0] += 1
                t0 = time.perf_counter()
                try:
                    conn.request("POST", path, body=images[i % len(images)], headers={"Content-Type": "image/png"})
                    r = conn.getresponse()
                    ok = r.status == 200
                    body = json.loads(r.read())
                except (OSError, http.client.HTTPException, ValueError) as e:
                    ok, body = False, {"error": repr(e)}
                    conn.close()  # reconnects on the next request
                elapsed = (time.perf_counter() - t0) * 1e3
                with lock:
                    latencies.append(elapsed)
                    if ok and body.get("digits"):
                        server_ms.append(body["latency_ms"])
                    else:
                        errors.append(body.get("error", f"unexpected reply {body}"))
        finally:
            conn.close()

    server_cpu, client_cpu = _cpu_seconds(server_pid), sum(os.times()[:2])
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(client) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - start
    client_cpu = sum(os.times()[:2]) - client_cpu
    if server_cpu is not None:
        server_cpu = _cpu_seconds(server_pid) - server_cpu
    per = lambda cpu: round(cpu * 1e3 / max(1, len(latencies)), 2) if cpu is not None else None  # noqa: E731
    return {"concurrency": concurrency, "requests": len(latencies), "errors": len(errors),
            "first_errors": errors[:3], "p50_ms": _pct(latencies, 50), "p90_ms": _pct(latencies, 90),
            "p99_ms": _pct(latencies, 99), "max_ms": _pct(latencies, 100), "server_p50_ms": _pct(server_ms, 50),
            "server_p99_ms": _pct(server_ms, 99), "readings_per_s": round(len(server_ms) / wall, 1),
            "wall_s": round(wall, 1), "server_cpu_ms_per_request": per(server_cpu),
            "client_cpu_ms_per_request": per(client_cpu), "load_average": round(os.getloadavg()[0], 1)}


class Attack:
    """Hostile images, slowloris heads and idle connections against the server, in a process of their own.

    A process apart, so the attackers' threads do not share a GIL with the normal clients
    whose latency is measured.
    """

    def __init__(self, url: str):
        self.url = url
        self.counts: dict[str, int] = {}
        ctx = multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        self._results = ctx.Queue()
        self._proc = ctx.Process(target=_attack_main, daemon=True, args=(
            url, list(FLAGS.hostile_images), FLAGS.bombs, FLAGS.slowloris, FLAGS.idle, self._stop, self._results))

    def __enter__(self) -> "Attack":
        self._proc.start()
        self._results.get(timeout=120)  # "started"
        time.sleep(2.0)  # let the connections pile up before measuring
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.counts = self._results.get(timeout=120)
        self._proc.join(timeout=30)


def _attack_main(url: str, kinds: list[str], bombs: int, slowloris: int, idle: int, stop: Any, results: Any) -> None:
    """The attack process: runs the attackers until `stop` is set, then reports what they got."""
    # An attacker does not run on the server's cores; here it must, so it yields them to the server
    # and the normal clients (it still runs flat out whenever a core is free).
    os.nice(10)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    parts = urllib.parse.urlsplit(url)
    address = (parts.hostname, parts.port)
    images = hostile_images(kinds)
    counts: dict[str, int] = {}
    lock = threading.Lock()

    def count(key: str) -> None:
        with lock:
            counts[key] = counts.get(key, 0) + 1

    def post_images(k: int) -> None:
        with httpx.Client(timeout=60) as c:
            i = k
            while not stop.is_set():
                try:
                    r = c.post(f"{url}/api/recognize", content=images[i % len(images)])
                    count(f"image_{r.status_code}")
                except httpx.HTTPError:
                    count("image_failed")
                i += 1

    def hold_connection(trickle: bool) -> None:
        head = b"POST /api/recognize HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Slow: " + b"a" * 4000
        while not stop.is_set():
            try:
                sock = socket.create_connection(address, timeout=1)
            except OSError:
                count("connect_failed")
                stop.wait(0.5)
                continue
            count("slowloris_opened" if trickle else "idle_opened")
            with sock:
                i = 0
                while not stop.is_set():
                    try:
                        if trickle:
                            sock.sendall(head[i % len(head):i % len(head) + 1])
                            i += 1
                        sock.settimeout(0.5)
                        if sock.recv(1024) == b"":
                            break  # closed by the server: open another
                    except socket.timeout:
                        continue
                    except OSError:
                        break

    targets = [(post_images, (k,)) for k in range(bombs)]
    targets += [(hold_connection, (True,))] * slowloris + [(hold_connection, (False,))] * idle
    threads = [threading.Thread(target=t, args=a, daemon=True) for t, a in targets]
    for t in threads:
        t.start()
    results.put("started")
    stop.wait()
    for t in threads:
        t.join(timeout=65)
    results.put(counts)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if bool(FLAGS.workdir) == bool(FLAGS.url):
        raise app.UsageError("pass exactly one of --workdir (start a server) and --url (use a running one)")
    try:
        levels = [int(c) for c in FLAGS.concurrency]
    except ValueError:
        raise app.UsageError(f"--concurrency takes whole numbers, got {FLAGS.concurrency}") from None
    if not levels or min(levels) < 1 or FLAGS.requests < 1:
        raise app.UsageError("--concurrency values and --requests must be at least 1")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no log line per request
    images = page_drawings() if FLAGS.images == "drawing" else digit_photos()
    proc = None
    figures: dict = {"images": FLAGS.images, "mode": FLAGS.mode,
                     "image_bytes": int(np.mean([len(p) for p in images])), "phases": []}
    try:
        if FLAGS.workdir:
            proc, url = start_server(FLAGS.workdir)
        else:
            url = FLAGS.url.rstrip("/")
            _check_loopback(url)
        figures["url"] = url
        pid = proc.pid if proc is not None else None
        for r in range(FLAGS.rounds):
            for level in levels:
                quiet = run_phase(url, images, level, pid)
                figures["phases"].append({"round": r, "attack": False, **quiet})
                print(json.dumps(figures["phases"][-1]), flush=True)
                if FLAGS.hostile:
                    attack = Attack(url)
                    with attack:
                        hostile = run_phase(url, images, level, pid)
                    counts = attack.counts
                    figures["phases"].append({"round": r, "attack": True, **hostile, "attack_counts": counts,
                                              "p99_ratio": round(hostile["p99_ms"] / quiet["p99_ms"], 2)})
                    print(json.dumps(figures["phases"][-1]), flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
    keys = ["p50_ms", "p99_ms", "server_p50_ms", "server_p99_ms", "readings_per_s", "server_cpu_ms_per_request",
            "client_cpu_ms_per_request", "errors", "load_average", "p99_ratio"]
    figures["medians"] = []
    for level in levels:
        for attack in ([False, True] if FLAGS.hostile else [False]):
            runs = [p for p in figures["phases"] if p["concurrency"] == level and p["attack"] == attack]
            row = {"concurrency": level, "attack": attack, "rounds": len(runs)}
            for k in keys:
                values = [p[k] for p in runs if p.get(k) is not None]
                row[k] = round(float(np.median(values)), 2) if values else None
            figures["medians"].append(row)
    header = ["clients", "attack", "p50 ms", "p99 ms", "server p50", "server p99", "readings/s", "server cpu ms",
              "client cpu ms", "errors", "load", "p99 ratio"]
    rows = [header] + [[str(m["concurrency"]), "yes" if m["attack"] else "no"] + [str(m[k]) for k in keys]
                       for m in figures["medians"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    print(f"medians over {FLAGS.rounds} round(s):")
    print("\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows))
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    app.run(main)
