"""An OpenAI-compatible server with continuous batching (the `serve` extra: starlette, uvicorn).

    python -m tinybit.serve --model PATH [--host 127.0.0.1] [--port 8000] [-t N] [--max-batch 32] [--ctx N]

GET /health, GET /v1/models, POST /v1/completions and POST /v1/chat/completions (the model's chat template), each
streamed as server-sent events ending in `data: [DONE]` when "stream" is true. Request fields: model, prompt (text
or token ids) or messages, max_tokens, temperature, top_p, top_k, seed, stop, n (1), stream, and "truncate" (keep
the end of a prompt too long for the context); other fields are ignored.

One engine thread runs the model. Each step, every active request advances by one token, or by a chunk of at most
--prefill-chunk tokens of its prompt, all in one Model.forward_batch pass: each linear reads its weights once for
all of them, each request attends to its own KV cache. A step that admits requests runs only their first chunks,
so that a new request's first token comes one chunk after the running step, not one chunk and a batch later.
Requests join and leave between steps; a client gone away frees its slot at the next step. Activations are
quantized per token and the kernels are exact, so a request's tokens are the same alone or among others (float
schemes: up to BLAS's summation order).
"""
import asyncio
import collections
import contextlib
import dataclasses
import json
import math
import signal
import sys
import threading
import time
import traceback
import uuid

import numpy as np

from . import kernels
from .cli import OneLineParser, check_threads, exit_on_error
from .errors import TinybitError, UsageError, is_int
from .generate import TextStream, compile_notice, encode_messages, encode_prompt, sample, truncate_prompt
from .model import load


# --- the engine: continuous batching over Model.forward_batch -----------------------------------------------------
def warm_up_steps(model, n):
    """Compile (or load) the kernels of the engine's steps before the first request waits on them: Model.forward_batch
    over 1 token (the per-token kernels), NARROW_LANES (the narrow table GEMM) and a prompt chunk of n."""
    # (a fault token 0 meets is reported where a request meets it)
    with compile_notice(), contextlib.suppress(TinybitError):
        for tokens in sorted({1, min(kernels.NARROW_LANES, n), n}):
            model.forward_batch([[0] * tokens], [model.new_cache(tokens)])


@dataclasses.dataclass
class Job:
    """One request in the engine: its prompt, sampling, and where its events go (an asyncio queue of
    ("text", piece), then ("end", finish_reason) or ("error", message))."""
    prompt: list
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    text: TextStream  # the stop strings' cut
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    tokens: list = dataclasses.field(default_factory=list)  # generated ids
    fed: int = 0  # prompt tokens in the cache
    cache: object = None
    rng: object = None
    cancelled: bool = False  # set by the client's side: the job leaves at the next step
    done: bool = False

    def send(self, *event):
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Engine:
    """The model's one thread: admits waiting jobs up to max_batch, steps the active ones together."""

    def __init__(self, model, max_batch, prefill_chunk):
        self.model, self.max_batch, self.prefill_chunk = model, max_batch, prefill_chunk
        self.waiting, self.active = collections.deque(), []
        self.admitted = False  # the last step ran only new jobs' first chunks
        self.wake, self.stopping = threading.Condition(), False
        self.thread = threading.Thread(target=self.run, name="tinybit-engine", daemon=True)

    def submit(self, job):
        with self.wake:
            self.waiting.append(job)
            self.wake.notify()

    def stop(self):
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join()

    def run(self):
        while True:
            with self.wake:
                while not (self.waiting or self.active or self.stopping):
                    self.wake.wait()
                if self.stopping:
                    for job in list(self.waiting) + self.active:
                        job.send("error", "the server is shutting down")
                    return
                while self.waiting and len(self.active) < self.max_batch:
                    job = self.waiting.popleft()
                    job.cache = self.model.new_cache(len(job.prompt) + job.max_tokens)
                    job.rng = np.random.default_rng(job.seed)
                    self.active.append(job)
            self.active = [job for job in self.active if not job.cancelled]
            if self.active:
                try:
                    self.step()
                except Exception as e:  # noqa: BLE001 (the engine outlives a failed step; its jobs get the error)
                    if not isinstance(e, TinybitError):  # not the model's own failure (an overflow): a bug
                        traceback.print_exc()
                    for job in self.active:
                        job.send("error", f"{type(e).__name__}: {e}")
                    self.active = []

    def step(self):
        """Every active job one token further (or one chunk of its prompt), in one pass. A step that admits new
        jobs runs their first chunks alone: a new request waits for one chunk of its own, not for a chunk plus
        every stream's token (the streams pause for that chunk, about as long as the tokens they would add). Never
        twice in a row: requests arriving at every step do not stall the running ones."""
        new = [job for job in self.active if job.fed == 0]
        batch = new if new and not self.admitted else self.active
        self.admitted = batch is new
        feeds = []
        for job in batch:
            if job.fed < len(job.prompt):
                n = min(self.prefill_chunk, len(job.prompt) - job.fed)
                feeds.append(job.prompt[job.fed:job.fed + n])
                job.fed += n
            else:
                feeds.append(job.tokens[-1:])
        logits = self.model.forward_batch(feeds, [job.cache for job in batch])  # (len(batch), vocab)
        for job, row in zip(batch, logits):
            if job.fed == len(job.prompt):  # its prompt is in: a new token
                self.advance(job, sample(row, job.temperature, job.top_k, job.top_p, job.rng))
        self.active = [job for job in self.active if not job.done]

    def advance(self, job, token):
        finish = None
        if token in self.model.config.eos_token_ids:
            finish = "stop"
        else:
            job.tokens.append(token)
            piece = job.text.push(token)
            if piece:
                job.send("text", piece)
            if job.text.stopped:
                finish = "stop"
            elif len(job.tokens) == job.max_tokens:
                finish = "length"
        if finish:
            piece = job.text.end()
            if piece:
                job.send("text", piece)
            job.send("end", finish)
            job.done = True


# --- requests ------------------------------------------------------------------------------------------------

class RequestError(Exception):
    """An OpenAI-style error: HTTP status, message, the request field it is about, a code."""

    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self):
        kind = {404: "not_found_error", 413: "request_too_large"}.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# field: (what it must be, the check of its type); null is the same as absent
FIELDS = {"model": ("a string", lambda v: isinstance(v, str)),
          "prompt": ("a string or a list of token ids", lambda v: isinstance(v, str) or (
              isinstance(v, list) and all(is_int(t) for t in v))),
          "messages": ("a list of {role, content} objects", lambda v: isinstance(v, list) and all(
              isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
              for m in v)),
          "max_tokens": ("an integer", is_int), "max_completion_tokens": ("an integer", is_int),
          "temperature": ("a number", is_number), "top_p": ("a number", is_number), "top_k": ("an integer", is_int),
          "seed": ("an integer", is_int), "n": ("an integer", is_int), "stream": ("a boolean", lambda v: isinstance(v, bool)),
          "truncate": ("a boolean", lambda v: isinstance(v, bool)),
          "stop": ("a string or a list of strings", lambda v: isinstance(v, str) or (
              isinstance(v, list) and all(isinstance(s, str) for s in v)))}


class Server:
    """The HTTP side: validates requests into Jobs and turns their events into OpenAI responses."""

    def __init__(self, model, name, engine, ctx):
        self.model, self.name, self.engine, self.ctx = model, name, engine, ctx

    def fields(self, body, chat):
        """The request's fields, each checked for type (422) and range (400); null fields dropped."""
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        f = {k: v for k, v in body.items() if v is not None}
        for key, (what, ok) in FIELDS.items():
            if key in f and not ok(f[key]):
                raise RequestError(422, f"'{key}' must be {what}", key, "invalid_type")
        need = "messages" if chat else "prompt"
        if need not in f:
            raise RequestError(400, f"'{need}' is required", need, "missing_field")
        if f.get("model", self.name) != self.name:
            raise RequestError(404, f"the model '{f['model']}' does not exist; this server has '{self.name}'",
                               "model", "model_not_found")
        if f.get("n", 1) != 1:
            raise RequestError(400, "only n = 1 is supported", "n", "unsupported_value")
        for key, lo, hi in (("temperature", 0, 2), ("top_p", 0, 1), ("top_k", 0, None), ("seed", 0, 2 ** 63 - 1)):
            if key in f and not ((f[key] > lo if key == "top_p" else f[key] >= lo) and (hi is None or f[key] <= hi)):
                raise RequestError(400, f"'{key}' {f[key]} is out of range", key, "invalid_value")
        if f.get("max_tokens", f.get("max_completion_tokens", 1)) < 1:
            raise RequestError(400, "'max_tokens' must be at least 1", "max_tokens", "invalid_value")
        if isinstance(f.get("stop"), list) and len(f["stop"]) > 4:
            raise RequestError(400, "'stop' takes at most 4 strings", "stop", "invalid_value")
        return f

    def job(self, f, chat, loop):
        """The request's Job: the prompt tokenized (chat: in the template), fitted to the context."""
        try:
            if chat:
                prompt = encode_messages(self.model, f["messages"])
            elif isinstance(f["prompt"], str):
                prompt = encode_prompt(self.model, f["prompt"])
            else:
                prompt = f["prompt"]
        except TinybitError as e:
            raise RequestError(400, str(e), "messages" if chat else "prompt") from None
        vocab = self.model.config.vocab_size
        if not prompt or not all(0 <= t < vocab for t in prompt):
            raise RequestError(400, f"the prompt must hold 1 or more token ids in 0..{vocab - 1}", "prompt")
        default = self.ctx - len(prompt) if chat else 16  # OpenAI's defaults: chat to the end, completions 16
        max_tokens = f.get("max_tokens", f.get("max_completion_tokens", max(default, 1)))
        if len(prompt) + max_tokens > self.ctx:
            if not f.get("truncate") or max_tokens >= self.ctx:
                raise RequestError(400, f"the prompt's {len(prompt)} tokens and max_tokens {max_tokens} exceed the "
                                        f"context of {self.ctx} tokens (\"truncate\": true keeps the prompt's end)",
                                   "messages" if chat else "prompt", "context_length_exceeded")
            c = self.model.config
            prompt = truncate_prompt(prompt, self.ctx - max_tokens, c.bos_token_id if c.add_bos else None)
        stop = (f["stop"],) if isinstance(f.get("stop"), str) else tuple(f.get("stop", ()))
        return Job(prompt, max_tokens, float(f.get("temperature", 1.0)), f.get("top_k", 0), float(f.get("top_p", 1.0)),
                   f.get("seed", int.from_bytes(uuid.uuid4().bytes[:4], "little")),
                   TextStream(self.model.tokenizer, stop), loop, asyncio.Queue())

    def chunk(self, kind, rid, piece=None, finish=None, first=False):
        """One response object: a completion (kind "text_completion") or a chat one, whole or a streamed piece."""
        base = {"id": rid, "created": int(time.time()), "model": self.name}
        if kind == "text_completion":
            return dict(base, object=kind, choices=[{"index": 0, "text": piece or "", "finish_reason": finish,
                                                     "logprobs": None}])
        delta = {"role": "assistant", "content": ""} if first else ({"content": piece} if piece else {})
        return dict(base, object="chat.completion.chunk",
                    choices=[{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}])


def usage(job):
    return {"prompt_tokens": len(job.prompt), "completion_tokens": len(job.tokens),
            "total_tokens": len(job.prompt) + len(job.tokens)}


# --- the ASGI app ---------------------------------------------------------------------------------------------

def make_app(server, max_body):
    """The starlette application over server (its engine started and stopped with the app)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    def error(e):
        return JSONResponse(e.body(), status_code=e.status)

    async def read_json(request):
        size = int(request.headers.get("content-length") or 0)
        body = b""
        if size <= max_body:
            async for part in request.stream():
                body += part
                if len(body) > max_body:
                    break
        if max(size, len(body)) > max_body:
            raise RequestError(413, f"the request body is over {max_body} bytes", None, "request_too_large")
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as e:
            raise RequestError(400, f"the request body is not valid JSON: {str(e)[:200]}", None, "invalid_json") from None

    async def generate(request, chat):
        try:
            f = server.fields(await read_json(request), chat)
            job = server.job(f, chat, asyncio.get_running_loop())
        except RequestError as e:
            return error(e)
        server.engine.submit(job)
        kind = "chat.completion" if chat else "text_completion"
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if f.get("stream"):
            return StreamingResponse(stream(job, kind, rid), media_type="text/event-stream")
        pieces = []
        try:
            while True:
                event = await job.events.get()
                if event[0] == "text":
                    pieces.append(event[1])
                elif event[0] == "error":
                    return JSONResponse({"error": {"message": event[1], "type": "server_error", "param": None,
                                                   "code": None}}, status_code=500)
                else:
                    break
        finally:
            job.cancelled = True  # a no-op once done; frees the slot if the client went away
        text, finish = "".join(pieces), event[1]
        body = {"id": rid, "object": kind if chat else "text_completion", "created": int(time.time()),
                "model": server.name, "usage": usage(job)}
        choice = {"index": 0, "finish_reason": finish, "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return JSONResponse(dict(body, choices=[choice]))

    async def stream(job, kind, rid):
        def sse(obj):
            return f"data: {json.dumps(obj)}\n\n"
        try:
            if kind == "chat.completion":
                yield sse(server.chunk(kind, rid, first=True))
            while True:
                event = await job.events.get()
                if event[0] == "text":
                    yield sse(server.chunk(kind, rid, piece=event[1]))
                elif event[0] == "error":
                    yield sse({"error": {"message": event[1], "type": "server_error", "param": None, "code": None}})
                    break
                else:
                    yield sse(dict(server.chunk(kind, rid, finish=event[1]), usage=usage(job)))
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled = True  # the client went away (or the job is done): its slot frees at the next step

    async def completions(request):
        return await generate(request, chat=False)

    async def chat_completions(request):
        return await generate(request, chat=True)

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": server.name, "object": "model", "created": 0,
                                                         "owned_by": "tinybit"}]})

    async def health(request):
        return JSONResponse({"status": "ok", "active": len(server.engine.active), "waiting": len(server.engine.waiting)})

    async def http_error(request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error(RequestError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", None, code))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.engine.thread.start()
        yield
        server.engine.stop()

    routes = [Route("/health", health), Route("/v1/models", models),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"])]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})


# --- the command ------------------------------------------------------------------------------------------------

def main(argv=None):
    ap = OneLineParser(prog="tinybit.serve", description="An OpenAI-compatible server for a tinybit model.")
    ap.add_argument("--model", "-m", required=True, help="model directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("-t", "--threads", type=int, default=None, help="kernel threads (default: all cores)")
    ap.add_argument("--max-batch", type=int, default=32, help="requests stepped together (default 32)")
    ap.add_argument("--ctx", type=int, default=None, help="tokens per request, prompt and answer (default: the "
                                                          "model's max_seq_len)")
    ap.add_argument("--prefill-chunk", type=int, default=64, help="prompt tokens a request takes per step (default 64)")
    ap.add_argument("--max-body", type=int, default=1 << 20, help="largest request body in bytes (default 1 MiB)")
    ap.add_argument("--name", default=None, help="the model's name in the API (default: the directory's name)")
    ap.add_argument("--debug", action="store_true")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    return exit_on_error("tinybit.serve", args.debug, lambda: run(args))


def run(args):
    check_threads(args.threads)
    for flag, value in (("--max-batch", args.max_batch), ("--prefill-chunk", args.prefill_chunk),
                        ("--max-body", args.max_body)):
        if value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    try:
        import uvicorn
    except ImportError as e:
        raise UsageError(f"tinybit.serve needs the serve extra (pip install -e \".[serve]\"): {e}") from None
    model = load(args.model, threads=args.threads, in_memory=True)  # a batch step over the file's map: 10-20% slower
    if model.tokenizer is None:
        raise UsageError(f"--model {args.model}: has no tokenizer.json; the API speaks text")
    ctx = model.config.max_seq_len if args.ctx is None else args.ctx
    if not 2 <= ctx <= model.config.max_seq_len:
        raise UsageError(f"--ctx must be in 2..{model.config.max_seq_len} (the model's max_seq_len), got {ctx}")
    warm_up_steps(model, min(args.prefill_chunk, ctx - 1))
    name = args.name or (args.model.rstrip("/").rsplit("/", 1)[-1])
    server = Server(model, name, Engine(model, args.max_batch, args.prefill_chunk), ctx)
    print(f"tinybit.serve: {name} on http://{args.host}:{args.port}/v1 (max batch {args.max_batch}, ctx {ctx})",
          file=sys.stderr, flush=True)
    # uvicorn stops on SIGTERM / Ctrl-C (no new connections; the active requests get 5 s, then are cancelled),
    # then raises that signal again under the handlers it found: these, so the asked-for stop exits 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(make_app(server, args.max_body), host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
