"""Benchmark: `memdec serve` throughput, base alone vs base + Memory Decoder, with 1 and 8 concurrent clients.

Run: ``python benchmarks/serve.py`` (defaults: ``embedded:base-large`` as the base and ``embedded:base-small``
standing in for the decoder: same tokenizer, a quarter of the width; serving cost depends on shapes, not on what
the weights know). For each system a server is started on a free 127.0.0.1 port (``memdec serve --device cpu``),
warmed up with one request, then each client count sends ``--requests_per_client`` greedy completions of
``--max_tokens`` tokens per client, back to back; a client's next request starts when its last answer arrives.

Prints ``name: value`` lines: per system and client count ``{system}_c{n}_requests_per_s`` and ``_tokens_per_s``
(completion tokens from the replies' usage ÷ wall time), then the overheads, base tokens/s ÷ MemDec tokens/s, the
8-client one last.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from jsonargparse import CLI

PROMPTS = ["The patient was admitted with", "In the study, the authors", "The court held that the",
           "Proteins are folded by", "The results of the trial", "A new method for the",
           "The committee decided to", "After the surgery, the"]  # fmt: skip
CLIENTS = (1, 8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(base: str, memdec: str | None, max_batch_size: int, startup_s: float):
    port = free_port()
    cmd = [sys.executable, "-m", "lightning_memdec", "serve", "--base", base, "--port", str(port), "--device", "cpu",
           "--queue.max_batch_size", str(max_batch_size), "--queue.batch_timeout", "0.02"]  # fmt: skip
    cmd += ["--memdec", memdec, "--lmbda", "0.3"] if memdec else []
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + startup_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(1)
    stop_server(proc)
    raise RuntimeError(f"the server was not up after {startup_s} s: {' '.join(cmd)}")


def stop_server(proc) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def client(url: str, index: int, requests: int, max_tokens: int) -> int:
    """One client's requests back to back; the completion tokens it got."""
    tokens = 0
    with httpx.Client(timeout=600) as http:
        for r in range(requests):
            body = {"prompt": PROMPTS[(index + r) % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0}
            reply = http.post(f"{url}/v1/completions", json=body)
            reply.raise_for_status()
            tokens += reply.json()["usage"]["completion_tokens"]
    return tokens


def throughput(url: str, clients: int, requests_per_client: int, max_tokens: int) -> tuple[float, float]:
    """(requests/s, tokens/s) with ``clients`` concurrent clients."""
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(lambda i: client(url, i, requests_per_client, max_tokens), range(clients)))
    elapsed = time.perf_counter() - start
    return clients * requests_per_client / elapsed, tokens / elapsed


def main(
    base: str = "embedded:base-large",
    memdec: str = "embedded:base-small",
    max_tokens: int = 32,
    requests_per_client: int = 4,
    max_batch_size: int = 8,
    startup_s: float = 300.0,
) -> dict:
    results = {}
    for system, decoder in (("base", None), ("memdec", memdec)):
        proc, url = start_server(base, decoder, max_batch_size, startup_s)
        try:
            client(url, 0, 1, max_tokens)  # warm-up: first-call costs are not throughput
            for n in CLIENTS:
                rps, tps = throughput(url, n, requests_per_client, max_tokens)
                results[f"{system}_c{n}_requests_per_s"], results[f"{system}_c{n}_tokens_per_s"] = rps, tps
        finally:
            stop_server(proc)
    for name, value in results.items():
        print(f"{name}: {value:.2f}")
    for n in CLIENTS:
        print(f"memdec_overhead_c{n}: {results[f'base_c{n}_tokens_per_s'] / results[f'memdec_c{n}_tokens_per_s']:.3f}")
    return results


if __name__ == "__main__":
    CLI(main, as_positional=False)
