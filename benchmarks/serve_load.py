"""Load test of `tuneoff serve` on loopback: requests/s, tokens/s and p50/p95 latency with 1 and 3
adapters on one base, under concurrency 4 and 8. Bounded: each cell runs `--duration` seconds
(default 4; about 30 s in all with start-up), and only 127.0.0.1 is ever contacted.

    python benchmarks/serve_load.py                       # embedded tiny model, CPU
    python benchmarks/serve_load.py --model ./qwen2.5-1.5b --device cuda --out results.json

The adapters are LoRA adapters with random (non-zero) weights made here, one per seed, so that
every adapter gives different answers; the server is the real `tuneoff serve` in its own process.
Each request is a chat completion of `--max-tokens` tokens at most (greedy); requests cycle over
the adapters in use, so with 3 adapters consecutive decoding turns switch adapters.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROMPTS = [
    "Give three tips for staying healthy.",
    "What is 17 + 25?",
    "Reverse the word 'merge'.",
    "Sort these numbers: 5 2 9 1",
]


def make_adapters(model: str, n: int, directory: Path) -> list[Path]:
    """`n` LoRA adapters (q/k/v/o, r=8) with random weights, one per seed."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneoff.model import resolve_model_path

    paths = []
    for seed in range(n):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(resolve_model_path(model), dtype=torch.float32)
        config = LoraConfig(
            r=8, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            init_lora_weights=False,
        )  # fmt: skip
        peft_model = get_peft_model(base, config)
        path = directory / f"adapter{seed}"
        peft_model.save_pretrained(path, safe_serialization=True)
        paths.append(path)
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, adapters: list[Path], port: int, device: str, cap: int):
    cmd = [sys.executable, "-m", "tuneoff", "serve", "--model", model, "--port", str(port)]
    cmd += ["--device", device, "--max-tokens-cap", str(cap)]
    for i, path in enumerate(adapters):
        cmd += ["--adapter", f"a{i}={path}"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited: {server.stderr.read()[-2000:]}")
        try:
            status, _ = request(port, "GET", "/health", None)
            if status == 200:
                return server
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("the server did not start within 300 s")


def request(port: int, method: str, path: str, body: dict | None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"content-type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def run_cell(port: int, models: list[str], concurrency: int, seconds: float, max_tokens: int):
    """`concurrency` workers sending requests back to back for `seconds`."""
    latencies: list[float] = []
    tokens = [0]
    errors = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def worker(w: int) -> None:
        i = w
        while time.monotonic() < stop_at:
            body = {
                "model": models[i % len(models)],
                "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": max_tokens,
            }
            started = time.perf_counter()
            status, reply = request(port, "POST", "/v1/chat/completions", body)
            elapsed = time.perf_counter() - started
            with lock:
                if status == 200:
                    latencies.append(elapsed)
                    tokens[0] += reply["usage"]["completion_tokens"]
                else:
                    errors[0] += 1
            i += concurrency

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    latencies.sort()
    return {
        "adapters": len(models),
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors[0],
        "wall_s": wall,
        "requests_per_s": len(latencies) / wall,
        "completion_tokens_per_s": tokens[0] / wall,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else None,
        "p95_ms": 1000 * latencies[int(0.95 * (len(latencies) - 1))] if latencies else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:tiny-qwen2")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per cell (4)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(args.model, 3, Path(tmp))
        port = free_port()
        server = start_server(args.model, adapters, port, args.device, args.max_tokens)
        try:
            run_cell(port, ["a0", "a1", "a2"], 4, 1.0, args.max_tokens)  # warm-up, not reported
            cells = [
                run_cell(port, [f"a{i}" for i in range(n)], c, args.duration, args.max_tokens)
                for n in (1, 3)
                for c in args.concurrency
            ]
        finally:
            server.terminate()
            server.wait(timeout=30)
    result = {
        "model": args.model,
        "device": args.device,
        "max_tokens": args.max_tokens,
        "duration_s_per_cell": args.duration,
        "cells": cells,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
