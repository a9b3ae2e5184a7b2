"""Serve a base and its deltas over the OpenAI-compatible API in-process, call it with httpx, stop it.

Shows ``deltakit.runtime.ServingEngine`` (one resident base, deltas hot-swapped per request),
``create_app`` (the FastAPI app: /v1/models, /v1/completions, /v1/chat/completions), uvicorn on
127.0.0.1 in a background thread, and requests that pick a delta with the ``model`` field. Any OpenAI
client works the same way (``base_url="http://127.0.0.1:PORT/v1"``). Needs the ``serve`` extra.

    python examples/03_serve_openai.py --tiny
    python examples/03_serve_openai.py --base BASE_DIR --delta chat=DELTA_DIR --prompt "Hello"
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn

import deltakit
from deltakit.runtime import ServingEngine, create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_in_thread(app, port: int) -> tuple[uvicorn.Server, threading.Thread]:
    """Start uvicorn on 127.0.0.1:port in a daemon thread; returns once it accepts connections."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    return server, thread


def run(base: Path, deltas: dict[str, str], prompt: str, max_tokens: int) -> int:
    engine = ServingEngine.from_base(base, deltas=deltas)
    port = free_port()
    server, thread = serve_in_thread(create_app(engine), port)
    texts = {}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", timeout=60) as client:
            models = [m["id"] for m in client.get("/models").json()["data"]]
            print(f"models: {', '.join(models)}")
            for model in models:
                body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
                reply = client.post("/completions", json=body)
                reply.raise_for_status()
                texts[model] = reply.json()["choices"][0]["text"]
                print(f"  {model}: {texts[model]!r}")
            chat = client.post("/chat/completions", json={
                "model": next(iter(deltas)), "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens, "temperature": 0})  # fmt: skip
            chat.raise_for_status()
            print(f"  chat ({next(iter(deltas))}): {chat.json()['choices'][0]['message']['content']!r}")
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.close()
    print("server stopped")
    ok = set(deltas) <= set(texts) and not thread.is_alive()
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path)
    parser.add_argument("--delta", action="append", default=[], metavar="NAME=DIR", help="repeatable")
    parser.add_argument("--tiny", action="store_true", help="build a tiny base and two deltas")
    parser.add_argument("--prompt", default="Hello there")
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()
    if not args.tiny and (args.base is None or not args.delta):
        parser.error("give --base and --delta NAME=DIR, or --tiny")
    with tempfile.TemporaryDirectory(prefix="deltakit-example-") as tmp:
        deltas = dict(item.split("=", 1) for item in args.delta)
        if args.tiny:
            from _tiny import build_fleet

            args.base, finetunes = build_fleet(Path(tmp) / "models", 2)
            for i, ft in enumerate(finetunes):
                out = Path(tmp) / f"delta-{i}"
                deltakit.compress(args.base, ft, out, method="svd", ratio=0.25)
                deltas[f"tiny-{i}"] = str(out)
        return run(args.base, deltas, args.prompt, args.max_tokens)


if __name__ == "__main__":
    sys.exit(main())
