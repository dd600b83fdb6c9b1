"""Load test of `egaku serve` on loopback with the tiny pipeline, and the cost of the HTTP layer.

    .venv/bin/python bench/serve.py            # writes bench/results/serve.json (about 3-5 minutes on 2 cores)

Two measurements, in one run, against one `egaku serve --model tiny` subprocess:

1. HTTP overhead: the same generation (tiny model, 64x64, ``--steps``, b64_json) called alternately
   through the Python API in this process and over HTTP (one request at a time, decoding the returned
   PNG included), so drifting load from other processes hits both sides alike. Overhead = HTTP p50 /
   direct p50 - 1 (target: under 10%).
2. Load: ``--requests`` requests from ``--clients`` concurrent clients (each sends its share one after
   another). Every request must get an answer, 200 or 429 (queue full); a request without an HTTP
   answer counts as lost. Server RSS is read before and after; latency p50/p99 of the answered ones.

Both sides run torch with ``--threads`` threads (1 by default: on a shared 2-core machine two OpenMP
threads per generation are often slower than one, and the comparison must use the same setting).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int, threads: int, queue_size: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.pop("EGAKU_API_KEY", None)
    env.pop("EGAKU_API_KEYS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "egaku", "serve", "--model", "tiny", "--device", "cpu", "--host", "127.0.0.1",
         "--port", str(port), "--queue-size", str(queue_size), "--log-level", "warning"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"egaku serve exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("egaku serve did not start within 180 s")


def http_generate(client: httpx.Client, body: dict) -> tuple[int, float]:
    started = time.perf_counter()
    response = client.post("/v1/images/generations", json=body)
    if response.status_code == 200:
        for item in response.json()["data"]:
            Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).load()
    return response.status_code, time.perf_counter() - started


def measure_overhead(url: str, pipe, body: dict, pairs: int) -> dict:
    from egaku.inference.generate import generate

    direct, over_http = [], []
    with httpx.Client(base_url=url, timeout=300) as client:
        for _ in range(2):  # warm-up of both sides (first-call allocations, lazy imports)
            generate(pipe, body["prompt"], steps=body["steps"], seed=0, width=64, height=64)
            http_generate(client, {**body, "seed": 0})
        for i in range(pairs):
            started = time.perf_counter()
            generate(pipe, body["prompt"], steps=body["steps"], seed=i, width=64, height=64)
            direct.append(time.perf_counter() - started)
            status, seconds = http_generate(client, {**body, "seed": i})
            if status != 200:
                raise SystemExit(f"overhead run: HTTP {status}")
            over_http.append(seconds)
    d50, h50 = statistics.median(direct), statistics.median(over_http)
    return {"pairs": pairs, "direct_p50_s": round(d50, 4), "http_p50_s": round(h50, 4),
            "direct_mean_s": round(statistics.fmean(direct), 4), "http_mean_s": round(statistics.fmean(over_http), 4),
            "overhead_p50": round(h50 / d50 - 1, 4), "target": 0.10, "meets_target": h50 / d50 - 1 < 0.10}


def load_test(url: str, body: dict, requests: int, clients: int, server: psutil.Process) -> dict:
    rss_before = server.memory_info().rss
    results: list[tuple[int | None, float]] = []
    lock = threading.Lock()
    shares = [requests // clients + (1 if k < requests % clients else 0) for k in range(clients)]

    def client_loop(count: int, index: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as client:
            for j in range(count):
                try:
                    status, seconds = http_generate(client, {**body, "seed": 1000 * index + j})
                except httpx.HTTPError:
                    status, seconds = None, float("nan")  # no HTTP answer: lost
                with lock:
                    results.append((status, seconds))

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(n, k)) for k, n in enumerate(shares)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    rss_after = server.memory_info().rss
    statuses = [s for s, _ in results]
    ok = [sec for s, sec in results if s == 200]
    answered = [sec for s, sec in results if s is not None]
    return {
        "requests": requests, "clients": clients, "sent": len(results),
        "status_200": statuses.count(200), "status_429": statuses.count(429),
        "other_status": sorted({s for s in statuses if s not in (200, 429, None)}),
        "lost": statuses.count(None), "all_answered_200_or_429": all(s in (200, 429) for s in statuses),
        "latency_200_p50_s": round(percentile(ok, 0.5), 4), "latency_200_p99_s": round(percentile(ok, 0.99), 4),
        "latency_answered_p50_s": round(percentile(answered, 0.5), 4),
        "latency_answered_p99_s": round(percentile(answered, 0.99), 4),
        "wall_s": round(wall, 2), "images_per_s": round(statuses.count(200) / wall, 3),
        "server_rss_before_mb": round(rss_before / 2**20, 1), "server_rss_after_mb": round(rss_after / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per image")
    parser.add_argument("--pairs", type=int, default=15, help="direct/HTTP pairs for the overhead figure")
    parser.add_argument("--queue-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    from egaku.models.loading import load_pipeline

    pipe = load_pipeline("tiny", "cpu", "float32")
    body = {"prompt": "a red circle on a blue background", "n": 1, "size": "64x64", "steps": args.steps,
            "response_format": "b64_json"}
    port = free_port()
    load_before = os.getloadavg()
    proc = start_server(port, args.threads, args.queue_size)
    url = f"http://127.0.0.1:{port}"
    try:
        server = psutil.Process(proc.pid)
        overhead = measure_overhead(url, pipe, body, args.pairs)
        print(f"overhead: direct p50 {overhead['direct_p50_s']} s, HTTP p50 {overhead['http_p50_s']} s "
              f"-> {overhead['overhead_p50']:+.1%}", flush=True)
        load = load_test(url, body, args.requests, args.clients, server)
        print(f"load: {load['status_200']} x 200, {load['status_429']} x 429, {load['lost']} lost; "
              f"p50 {load['latency_200_p50_s']} s, p99 {load['latency_200_p99_s']} s; RSS "
              f"{load['server_rss_before_mb']} -> {load['server_rss_after_mb']} MB", flush=True)
        health = httpx.get(url + "/health", timeout=10).json()
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    result = {
        "benchmark": "egaku serve: HTTP overhead and bounded load on loopback, tiny pipeline",
        "command": "python bench/serve.py " + " ".join(sys.argv[1:]),
        "config": {**vars(args), "request": body},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "overhead": overhead, "load": load, "server_after": health,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
