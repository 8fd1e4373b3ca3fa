"""Serving benchmark: aggregate decode tokens/s at 1, 4, 16 and 32 concurrent streams, and the time to first token of
a request that arrives while they stream.

    python bench/serve.py [--shape 2b4t|large] [--threads 1,2] [--clients 1,4,16,32] [--prompt 32] [--tokens 32]
                          [--head f32|int8] [--engines tinybit,llama.cpp] [--json]

The random ternary model of bench/e2e.py (same shape, same weights) is served by `python -m tinybit.serve` and, its
GGUF export (TQ2_0, the int8 head as Q8_0), by `python -m llama_cpp.server` (llama-cpp-python's OpenAI server, what a
Python user would pick; it serves one request at a time), each with the same threads on the same machine, one after
the other. Each client streams a completion of --tokens tokens (temperature 0; random weights rarely sample the end
token) after its own prompt of --prompt random letters (a token each); the clients start together. Per run:
    decode tok/s   the tokens streamed after every client has its first one, over the time from then to the last
                   token: all clients decoding together (llama.cpp's server: the last client alone)
    TTFT alone     a probe request (its own --prompt tokens, 1 new token) on the idle server
    TTFT loaded    the same probe sent once every client has its first token: its wait under load
The summary gives each run's decode tok/s over tinybit's own 1-client run and over llama.cpp's server with as many
clients, and the loaded TTFT over the idle one.
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


def start(cmd, port, log):
    """The server of cmd, once it answers on port; its output goes to the file `log` (a pipe nobody reads would fill
    and stop it)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    for _ in range(1800):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            if proc.poll() is not None:
                with open(log) as f:
                    sys.exit(f"serve.py: error: {' '.join(cmd)} exited: {f.read()[-2000:]}")
            time.sleep(0.1)
    proc.kill()
    sys.exit(f"serve.py: error: {' '.join(cmd)} did not start in 180 s (its output: {log})")


async def client(http, url, model, prompt, n_tokens, times):
    """Stream one completion, appending each token's arrival time (perf_counter) to `times`."""
    body = {"model": model, "prompt": prompt, "max_tokens": n_tokens, "temperature": 0, "stream": True}
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]" and json.loads(line[6:])["choices"][0].get("text"):
                times.append(time.perf_counter())


async def probe(http, url, model, prompt):
    """Time to first token of a 1-token completion."""
    t0, times = time.perf_counter(), []
    await client(http, url, model, prompt, 1, times)
    return times[0] - t0


def prompts(n, length, first=0):
    """n random lowercase strings: one token a letter in bench/e2e.py's byte-level vocabulary (llama.cpp's server
    takes text prompts only)."""
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return ["".join(np.random.default_rng(k + 1).choice(letters, length)) for k in range(first, first + n)]


async def load(url, model, n_clients, args):
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=64)) as http:
        alone = await probe(http, url, model, prompts(1, args.prompt, 1000)[0])
        times = [[] for _ in range(n_clients)]
        tasks = [asyncio.create_task(client(http, url, model, p, args.tokens, t))
                 for p, t in zip(prompts(n_clients, args.prompt), times)]
        while not all(times):  # until every client has its first token
            for t in tasks:
                if t.done():
                    t.result()  # (a client's error)
            if all(t.done() for t in tasks):
                sys.exit("serve.py: error: a client ended without a token")
            await asyncio.sleep(0.005)
        all_in = max(t[0] for t in times)
        loaded = await probe(http, url, model, prompts(1, args.prompt, 2000)[0])
        await asyncio.gather(*tasks)
    after = [x for t in times for x in t if x > all_in]
    return {"clients": n_clients, "tokens": sum(map(len, times)),
            "decode_tok_s": len(after) / (max(after) - all_in) if after else float("nan"),
            "ttft_alone_s": alone, "ttft_loaded_s": loaded}


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
            proc = start(cmd, port, os.path.join(work, f"{engine}-{threads}.log"))
            try:
                asyncio.run(load(f"http://127.0.0.1:{port}", "model", 1, args))  # warm
                for n in [int(c) for c in args.clients.split(",")]:
                    r = asyncio.run(load(f"http://127.0.0.1:{port}", "model", n, args))
                    r.update(engine=engine, threads=threads, shape=args.shape)
                    rows.append(r)
                    print(json.dumps(r) if args.json else
                          f"{engine:9} {threads}T {n:3} clients: decode {r['decode_tok_s']:7.1f} tok/s, TTFT alone "
                          f"{r['ttft_alone_s']:.2f} s, loaded {r['ttft_loaded_s']:.2f} s", flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    if not args.json:
        print(f"CPU: {cpu_model()}; shape {args.shape}, {args.head} head, prompt {args.prompt}, {args.tokens} tokens each")
        for r in rows:
            solo = next((x for x in rows if x["engine"] == "tinybit" and x["threads"] == r["threads"]
                         and x["clients"] == 1), None)
            other = next((x for x in rows if x["engine"] == "llama.cpp" and x["threads"] == r["threads"]
                          and x["clients"] == r["clients"]), None)
            print(f"{r['engine']:9} {r['threads']}T {r['clients']:3}: "
                  + (f"{r['decode_tok_s'] / solo['decode_tok_s']:.2f}x tinybit's single stream, " if solo else "")
                  + (f"{r['decode_tok_s'] / other['decode_tok_s']:.2f}x llama.cpp's server, "
                     if other and r["engine"] == "tinybit" else "")
                  + f"TTFT loaded / alone {r['ttft_loaded_s'] / r['ttft_alone_s']:.2f}")

if __name__ == "__main__":
    main()
