"""`mlx-hermes serve` against `mlx_lm.server` on the same weights: a multi-turn
chat with a long system prompt, streamed through the real OpenAI client.

    python benchmarks/server_bench.py --model tiny-hermes [--turns 4] [--system-tokens 1500]

For each server: time to first token of the first turn and of the follow-up
turns (where a prefix cache pays), decode tokens/s, and the ratio. Prints a
table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], url: str) -> subprocess.Popen:
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    process.kill()
    raise SystemExit(f"{cmd[0]} did not start")


def chat(url: str, model: str, system: str, turns: int, max_tokens: int) -> dict:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=600)
    messages = [{"role": "system", "content": system}]
    ttfts, rates = [], []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Question {turn}: tell me more."})
        start = time.perf_counter()
        first, text, n = None, [], 0
        for chunk in client.chat.completions.create(model=model, messages=messages,
                                                    max_tokens=max_tokens, temperature=0,
                                                    stream=True):
            piece = chunk.choices[0].delta.content if chunk.choices else None
            if piece:
                first = first or time.perf_counter()
                text.append(piece)
                n += 1
        end = time.perf_counter()
        ttfts.append((first or end) - start)
        rates.append((n - 1) / (end - first) if first and n > 1 else 0.0)
        messages.append({"role": "assistant", "content": "".join(text)})
    return {"first_ttft_s": ttfts[0], "followup_ttft_s": statistics.median(ttfts[1:]),
            "decode_chunks_per_s": statistics.median(rates)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--system-tokens", type=int, default=1500)
    p.add_argument("--max-tokens", type=int, default=32)
    a = p.parse_args()
    system = "You are a helpful assistant. " * (a.system_tokens // 6)

    results = {}
    servers = {
        "mlx-hermes": lambda port: [str(BIN / "mlx-hermes"), "serve", "-m", a.model, "--port",
                                    str(port), "--model-name", "m"],
        "mlx-lm": lambda port: [str(BIN / "mlx_lm.server"), "--model", a.model, "--port",
                                str(port)],
    }
    for name, command in servers.items():
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        process = start(command(port), url)
        try:
            model = "m" if name == "mlx-hermes" else "default_model"
            chat(url, model, system, 2, 4)  # warm-up (and a different conversation)
            results[name] = chat(url, model, "Another system prompt. " + system, a.turns,
                                 a.max_tokens)
        finally:
            process.terminate()
            process.wait(30)

    ours, theirs = results["mlx-hermes"], results["mlx-lm"]
    print(f"{'server':<11} {'first TTFT s':>12} {'follow-up TTFT s':>17} {'decode chunks/s':>16}")
    for name, r in results.items():
        print(f"{name:<11} {r['first_ttft_s']:>12.3f} {r['followup_ttft_s']:>17.3f} "
              f"{r['decode_chunks_per_s']:>16.1f}")
    ratios = {"first_ttft": theirs["first_ttft_s"] / ours["first_ttft_s"],
              "followup_ttft": theirs["followup_ttft_s"] / ours["followup_ttft_s"],
              "decode": ours["decode_chunks_per_s"] / max(theirs["decode_chunks_per_s"], 1e-9)}
    print("ratio (>1: mlx-hermes faster): " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    print(json.dumps({"model": a.model, "turns": a.turns, "system_tokens": a.system_tokens,
                      "max_tokens": a.max_tokens, "results": results, "ratios": ratios}))


if __name__ == "__main__":
    main()
