"""Start and stop a real server many times, with a request running and one queued.

    python benchmarks/shutdown_stress.py [--cycles 200] [--model PATH]

Each cycle: `mlx-hermes serve` (the tiny model of examples/make_tiny_model.py unless
--model, --max-batch 1), a streamed request that has produced its first
token, a second one waiting in the queue, then SIGINT. Counts the exit codes:
every one must be 0 (an abort is -6, SIGABRT: the engine worker's thread-local
MLX state destroyed while the interpreter finalized). Prints a table and JSON.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cycle(model: Path, env: dict) -> tuple[int, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlx_hermes", "--log-level", "info", "serve", "-m", str(model),
         "--port", str(port), "--max-batch", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.time() > deadline:
                return server.wait(), "did not start"
            time.sleep(0.05)
        body = {"model": "x", "messages": [{"role": "user", "content": "Hi"}]}
        name = httpx.get(f"{url}/api/tags").json()["models"][0]["model"]
        body["model"] = name
        first = threading.Event()

        def running() -> None:
            try:
                with httpx.stream("POST", f"{url}/api/chat", timeout=60,
                                  json={**body, "options": {"num_predict": 100_000}}) as r:
                    for _ in r.iter_lines():
                        first.set()
            except httpx.HTTPError:
                pass

        def queued() -> None:
            try:
                httpx.post(f"{url}/api/chat", json={**body, "stream": False}, timeout=60)
            except httpx.HTTPError:
                pass

        threads = [threading.Thread(target=running, daemon=True)]
        threads[0].start()
        first.wait(30)
        threads.append(threading.Thread(target=queued, daemon=True))
        threads[1].start()
        while httpx.get(f"{url}/health").json()["waiting"] < 1 and time.time() < deadline:
            time.sleep(0.01)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            out, _ = server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            out, _ = server.communicate()
    return server.returncode, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--model", type=Path, default=None)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    model = args.model
    if model is None:
        model = Path(tempfile.mkdtemp()) / "tiny-hermes"
        subprocess.run([sys.executable, str(ROOT / "examples" / "make_tiny_model.py"),
                        str(model)], check=True, env=env, capture_output=True)
    codes: collections.Counter = collections.Counter()
    failures = []
    start = time.time()
    for i in range(args.cycles):
        code, out = cycle(model, env)
        codes[code] += 1
        if code != 0 or "engine stopped" not in out:
            failures.append({"cycle": i, "exit": code, "tail": out[-600:]})
        print(f"cycle {i + 1}/{args.cycles}: exit {code}", file=sys.stderr, flush=True)
    result = {"cycles": args.cycles, "exit_codes": {str(k): v for k, v in codes.items()},
              "aborts": codes.get(-6, 0), "failures": failures[:5],
              "seconds": time.time() - start}
    print("exit code  cycles")
    for code, n in sorted(codes.items()):
        print(f"{code:>9}  {n}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
