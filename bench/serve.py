"""Serving benchmark: aggregate decode tokens/s and time to first token at 1, 4, 16 and 32 concurrent streams.

    python bench/serve.py [--shape 2b4t|large] [--threads 1,2] [--clients 1,4,16,32] [--prompt 32] [--tokens 32]
                          [--head f32|int8] [--json]

The random ternary model of bench/e2e.py (same shape, same weights) is served by `python -m tinybit.serve` and, its
GGUF export (TQ2_0), by `python -m llama_cpp.server` (llama-cpp-python's OpenAI server, what a Python user would
pick; it serves one request at a time), each with the same threads on the same machine, one after the other.
Each client streams a completion of --tokens tokens (temperature 0, ignoring the end token is not asked: random
weights rarely sample it) after its own --prompt random token ids; the clients start together. Per run:
    aggregate tok/s   all clients' streamed tokens / the wall time from the first request to the last token
    TTFT              each client's time to its first streamed token: median and max
    single-stream     the 1-client run's tok/s: the ratio column is aggregate / tinybit's own single stream
"""
import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e import ROOT, build_config, build_tensors, byte_level_bpe, cpu_model  # noqa: E402

sys.path.insert(0, ROOT)
from tinybit import io  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd, port):
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for _ in range(1800):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            if proc.poll() is not None:
                sys.exit(f"serve.py: error: {' '.join(cmd)} exited: {proc.stderr.read()[-2000:]}")
            time.sleep(0.1)
    proc.kill()
    sys.exit(f"serve.py: error: {' '.join(cmd)} did not start in 180 s")


async def client(http, url, model, prompt, n_tokens, t0):
    """(time to first token, tokens streamed, time of the last one) of one streamed completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": n_tokens, "temperature": 0, "stream": True}
    first, n, last = None, 0, None
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if json.loads(line[6:])["choices"][0].get("text") is not None:
                last = time.perf_counter() - t0
                first = first if first is not None else last
                n += 1
    return first, n, last


async def load(url, model, n_clients, vocab, args):
    prompts = [np.random.default_rng(k + 1).integers(2, vocab, args.prompt).tolist() for k in range(n_clients)]
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=64)) as http:
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(client(http, url, model, p, args.tokens, t0) for p in prompts))
    ttft = [r[0] for r in runs]
    return {"clients": n_clients, "tokens": sum(r[1] for r in runs), "tok_s": sum(r[1] for r in runs) / max(r[2] for r in runs),
            "ttft_median_s": float(np.median(ttft)), "ttft_max_s": max(ttft)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=("2b4t", "large"), default="2b4t")
    ap.add_argument("--head", choices=("f32", "int8"), default="int8")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--clients", default="1,4,16,32")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per client")
    ap.add_argument("--tokens", type=int, default=32, help="streamed tokens per client")
    ap.add_argument("--engines", default="tinybit,llama.cpp")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    config = build_config(args.shape, args.head)
    work = tempfile.mkdtemp(prefix="tinybit-serve-")
    tensors = build_tensors(config)
    model_dir = os.path.join(work, "model")
    io.save_model(model_dir, config, tensors, tokenizer_json=byte_level_bpe(config.vocab_size))
    engines = args.engines.split(",")
    if "llama.cpp" in engines:
        sys.path.insert(0, os.path.join(ROOT, "tools"))
        import gguf_export
        gguf_export.write_gguf(os.path.join(work, "model.gguf"), config, tensors, byte_level_bpe(config.vocab_size))
    del tensors
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        for engine in engines:
            port = free_port()
            cmd = ([sys.executable, "-m", "tinybit.serve", "--model", model_dir, "--port", str(port), "-t", str(threads),
                    "--name", "model", "--ctx", str(args.prompt + args.tokens + 1)] if engine == "tinybit" else
                   [sys.executable, "-m", "llama_cpp.server", "--model", os.path.join(work, "model.gguf"), "--port",
                    str(port), "--n_threads", str(threads), "--n_ctx", str(args.prompt + args.tokens + 1),
                    "--model_alias", "model"])
            proc = start(cmd, port)
            try:
                asyncio.run(load(f"http://127.0.0.1:{port}", "model", 1, config.vocab_size, args))  # warm
                single = None
                for n in [int(c) for c in args.clients.split(",")]:
                    r = asyncio.run(load(f"http://127.0.0.1:{port}", "model", n, config.vocab_size, args))
                    single = single or (r["tok_s"] if n == 1 else None)
                    r.update(engine=engine, threads=threads, shape=args.shape)
                    rows.append(r)
                    print(json.dumps(r) if args.json else
                          f"{engine:9} {threads}T {n:3} clients: {r['tok_s']:7.1f} tok/s aggregate, TTFT median "
                          f"{r['ttft_median_s']:.2f} s, max {r['ttft_max_s']:.2f} s", flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    if not args.json:
        print(f"CPU: {cpu_model()}; shape {args.shape}, {args.head} head, prompt {args.prompt}, {args.tokens} tokens each")
        for r in rows:
            solo = next(x for x in rows if x["engine"] == "tinybit" and x["threads"] == r["threads"] and x["clients"] == 1)
            other = next((x for x in rows if x["engine"] == "llama.cpp" and x["threads"] == r["threads"]
                          and x["clients"] == r["clients"]), None)
            print(f"{r['engine']:9} {r['threads']}T {r['clients']:3}: {r['tok_s'] / solo['tok_s']:.2f}x tinybit's single "
                  f"stream" + (f", {r['tok_s'] / other['tok_s']:.2f}x llama.cpp's server" if other and r['engine'] ==
                               'tinybit' else ""))


if __name__ == "__main__":
    main()
