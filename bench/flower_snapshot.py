"""Keep the Flower pages of a busy worker: run beside a bench, save what Flower rendered.

Starts Flower on the bench's broker, then every few seconds saves the worker page of each
online worker (its "Other" tab holds the ``vlmq_*`` figures of ``inspect stats``) and the page of
the newest succeeded task, keeping the worker page that showed the highest GPU utilisation.
The pages are Flower's own HTML; ``render`` turns one into a PNG on a machine with Chromium,
serving it with Flower's own static files and its "Other" tab open::

    python -m bench.flower_snapshot watch --broker redis://127.0.0.1:6379/13 --out $OUT/flower &
    python -m bench --modes d ...
    python -m bench.flower_snapshot render flower/worker-X.html docs/flower-worker-gpu.png
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import flower

GPU_UTIL = re.compile(r"<td>vlmq_gpu_utilization_percent</td>\s*<td[^>]*>([^<]*)</td>")


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _utilisation(html: str) -> float:
    found = GPU_UTIL.search(html)
    try:
        return float(found.group(1)) if found else -1.0
    except ValueError:
        return -1.0


def snapshot(base: str, out: Path, best: dict[str, float]) -> None:
    """Save each online worker's page (the busiest seen so far) and the newest task's page."""
    workers = json.loads(_get(f"{base}/workers?json=1"))["data"]
    for worker in workers:
        name = worker["hostname"]
        html = _get(f"{base}/worker/{name}")
        util = _utilisation(html)
        if util >= best.get(name, -2.0):
            best[name] = util
            (out / f"worker-{name.split('@')[0]}.html").write_text(html)
    tasks = json.loads(_get(f"{base}/api/tasks?limit=1&state=SUCCESS&sort_by=-received"))
    for task_id in tasks:
        (out / "task.html").write_text(_get(f"{base}/task/{task_id}"))


def watch(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log = (args.out / "flower.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", f"--broker={args.broker}", "flower",
         "--address=127.0.0.1", f"--port={port}"],
        stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "FLOWER_UNAUTHENTICATED_API": "true"},  # its tasks API, on localhost
    )  # fmt: skip
    best: dict[str, float] = {}
    try:
        while process.poll() is None:
            time.sleep(args.every_s)
            try:
                snapshot(f"http://127.0.0.1:{port}", args.out, best)
            except (OSError, ValueError, KeyError) as exc:
                print(f"flower_snapshot: {exc}", file=sys.stderr)
    finally:
        process.terminate()
    return process.returncode or 0


# Opens a tab of the page once its scripts have run, without the fade-in a screenshot would catch.
_OPEN_TAB = (
    "<script>addEventListener('load', () => {{"
    "document.querySelectorAll('.fade').forEach(e => e.classList.remove('fade'));"
    "document.getElementById('{tab}')?.click();}})</script>"
)


def render(args: argparse.Namespace) -> int:
    """Screenshot ``args.page`` as Flower would show it, with the tab ``args.tab`` open."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("render needs chromium on PATH", file=sys.stderr)
        return 2
    html = args.page.read_text().replace("</body>", _OPEN_TAB.format(tab=args.tab) + "</body>")
    static = Path(flower.__file__).parent

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/static/"):
                self.path = self.path.split("?")[0]
                return super().do_GET()
            body = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(static))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        done = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--virtual-time-budget=3000", f"--window-size={args.size}",
             f"--screenshot={args.png.resolve()}", f"http://127.0.0.1:{server.server_port}/"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        server.shutdown()
    if done.returncode:
        print(done.stderr[-2000:], file=sys.stderr)
    return done.returncode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = p.add_subparsers(required=True)
    w = commands.add_parser("watch", help="run Flower and keep its pages while a worker runs")
    w.add_argument("--broker", required=True, help="the bench's Redis URL")
    w.add_argument("--out", type=Path, required=True, help="folder for the saved pages")
    w.add_argument("--every-s", type=float, default=3.0)
    w.set_defaults(run=watch)
    r = commands.add_parser("render", help="a saved page as a PNG (needs chromium)")
    r.add_argument("page", type=Path)
    r.add_argument("png", type=Path)
    r.add_argument("--tab", default="worker-tab-other", help="the id of the tab to open")
    r.add_argument("--size", default="1280,1100")
    r.set_defaults(run=render)
    args = p.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
