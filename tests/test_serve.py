"""`python -m tinybit.serve`, driven as a user would: the `openai` client and raw HTTP (httpx), on loopback.

A small random ternary model with a byte-level BPE tokenizer and a chat template runs in a server subprocess.
Held: completions and chat, whole and streamed (the pieces join to the whole); stop strings, also across token
boundaries; usage counts; every error answered as OpenAI does ({"error": {...}}, 400/404/413/422); a client gone
mid-stream frees its slot and the server keeps serving; 32 concurrent streams of mixed prompt lengths, joining at
different times, each get exactly the text they get alone (greedy, and sampled with a seed); SIGTERM exits 0.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from util import byte_bpe, save_random_model, tiny_config

TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}" \
           "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
TEXT = "the quick brown fox jumps over the lazy dog; a server answers many clients at once. " * 6
CTX = 96


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model_dir, *flags):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tinybit.serve", "--model", str(model_dir), "--port", str(port),
                             "-t", "1", *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            if proc.poll() is not None:
                raise AssertionError(f"the server exited: {proc.stderr.read()}")
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("the server did not start in 60 s")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tk = byte_bpe(TEXT)
    c = tiny_config(vocab_size=tk.get_vocab_size(), bos_token_id=0, eos_token_ids=[1], add_bos=True,
                    chat_template=TEMPLATE, max_seq_len=CTX, quant={"scheme": "ternary"}, dim=64, ffn_dim=128,
                    n_heads=4, n_kv_heads=2, head_dim=16)
    path = save_random_model(tmp_path_factory.mktemp("serve") / "tiny", c, seed=11, tokenizer_json=tk.to_str())
    proc, url = start(path, "--max-batch", "32", "--max-body", "4096")
    yield url, openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    proc.terminate()
    proc.wait(timeout=30)


def test_models_and_health(server):
    url, client = server
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_completion_whole_and_streamed(server):
    _, client = server
    whole = client.completions.create(model="tiny", prompt="the quick brown", max_tokens=12, temperature=0)
    choice = whole.choices[0]
    assert choice.finish_reason in ("length", "stop") and whole.usage.prompt_tokens == 1 + len(
        byte_bpe(TEXT).encode("the quick brown").ids)  # bos + the text
    assert whole.usage.completion_tokens <= 12 and whole.usage.total_tokens == whole.usage.prompt_tokens + \
        whole.usage.completion_tokens
    pieces = list(client.completions.create(model="tiny", prompt="the quick brown", max_tokens=12, temperature=0,
                                            stream=True))
    assert "".join(p.choices[0].text for p in pieces) == choice.text
    assert pieces[-1].choices[0].finish_reason == choice.finish_reason


def test_chat_whole_and_streamed(server):
    _, client = server
    messages = [{"role": "user", "content": "a fox?"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert whole.choices[0].message.role == "assistant" and whole.object == "chat.completion"
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stop_strings_cut_the_text(server):
    _, client = server
    full = client.completions.create(model="tiny", prompt="a server", max_tokens=24, temperature=0).choices[0].text
    assert len(full) > 6, full
    stop = full[3:6]  # three characters from inside the text: likely across a token boundary
    for stream in (False, True):
        r = client.completions.create(model="tiny", prompt="a server", max_tokens=24, temperature=0, stop=[stop, "zz#"],
                                      stream=stream)
        if stream:
            pieces = list(r)
            text, finish = "".join(p.choices[0].text for p in pieces), pieces[-1].choices[0].finish_reason
        else:
            text, finish = r.choices[0].text, r.choices[0].finish_reason
        assert (text, finish) == (full[:full.find(stop)], "stop")


def raw(url, path, body, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url + path, content=data, headers={"content-type": "application/json"}, timeout=30, **kw)


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    ({"prompt": "x", "max_tokens": "many"}, 422, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, 422, "temperature"),
    ({"prompt": 3}, 422, "prompt"),
    ({"prompt": "x", "stop": [1]}, 422, "stop"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "n": 2}, 400, "n"),
    ({"prompt": "x", "model": "gpt-9"}, 404, "model"),
    ({"prompt": "fox " * 200, "max_tokens": 4}, 400, "prompt"),
    ({"max_tokens": 4}, 400, "prompt"),
    ({"prompt": [0, 10 ** 6]}, 400, "prompt"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x" * 5000}, 413, None),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    url, _ = server
    r = raw(url, "/v1/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["message"]


def test_other_errors(server):
    url, client = server
    r = raw(url, "/v1/chat/completions", {"messages": "hi"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "messages"
    assert httpx.get(url + "/v1/nothing").status_code == 404 and "error" in httpx.get(url + "/v1/nothing").json()
    assert httpx.get(url + "/v1/completions").status_code == 405
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x", max_tokens=2)
    ok = raw(url, "/v1/completions", {"prompt": "fox " * 200, "max_tokens": 4, "truncate": True, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == CTX - 4


def wait_idle(url):
    for _ in range(200):
        h = httpx.get(url + "/health").json()
        if h["active"] == 0 and h["waiting"] == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"the server still has work: {h}")


def test_a_client_gone_mid_stream_frees_its_slot(server):
    url, client = server
    with httpx.stream("POST", url + "/v1/completions", json={"prompt": "the", "max_tokens": 80, "stream": True,
                                                              "temperature": 0}, timeout=30) as r:
        next(r.iter_lines())
    wait_idle(url)
    assert client.completions.create(model="tiny", prompt="the", max_tokens=3, temperature=0).choices[0].text is not None


def test_32_streams_get_their_text_alone(server):
    """Mixed prompt lengths, joining at different times, greedy and seeded sampling: each stream's text equals the
    same request's text alone."""
    url, client = server
    words = TEXT.split()
    reqs = [dict(prompt=" ".join(words[:1 + (7 * i) % 30]), max_tokens=8 + i % 9,
                 temperature=0 if i % 2 else 0.9, seed=i, extra_body={"top_k": 0 if i % 3 else 20}) for i in range(32)]
    alone = [client.completions.create(model="tiny", **r).choices[0].text for r in reqs]
    wait_idle(url)
    got = [None] * 32

    def run(i):
        time.sleep(0.02 * (i % 8))  # join at different steps
        got[i] = "".join(p.choices[0].text for p in client.completions.create(model="tiny", stream=True, **reqs[i]))
    threads = [threading.Thread(target=run, args=(i,)) for i in range(32)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert time.time() - t0 < 120 and got == alone


def test_sigterm_exits_0(tmp_path):
    tk = byte_bpe(TEXT)
    c = tiny_config(vocab_size=tk.get_vocab_size(), bos_token_id=0, eos_token_ids=[1], chat_template=TEMPLATE)
    path = save_random_model(tmp_path / "m", c, seed=2, tokenizer_json=tk.to_str())
    proc, url = start(path)
    assert raw(url, "/v1/completions", {"prompt": "fox", "max_tokens": 2}).status_code == 200
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=2)


def test_bad_flags_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tinybit.serve", "--model", str(tmp_path / "none")], capture_output=True,
                       text=True, env=dict(os.environ))
    assert r.returncode == 2 and r.stderr.startswith("tinybit.serve: error: ") and r.stderr.count("\n") == 1


def test_admission_step_runs_only_the_new_first_chunks(tmp_path):
    """The engine, without HTTP: a step that admits requests feeds only their first prompt chunks; every other
    step advances every active request (a decode token, or its next chunk) in one forward_batch."""
    import asyncio

    import tinybit
    from tinybit.generate import TextStream
    from tinybit.serve import Engine, Job
    tk = byte_bpe(TEXT)
    c = tiny_config(vocab_size=tk.get_vocab_size(), bos_token_id=0, eos_token_ids=[], max_seq_len=CTX,
                    quant={"scheme": "ternary"})
    model = tinybit.load(str(save_random_model(tmp_path / "m", c, seed=3, tokenizer_json=tk.to_str())))
    fed = []

    class Recorded:  # the model, with each forward_batch's feed lengths kept
        config = model.config

        def new_cache(self, n):
            return model.new_cache(n)

        def forward_batch(self, feeds, caches):
            fed.append([len(f) for f in feeds])
            return model.forward_batch(feeds, caches)
    loop = asyncio.new_event_loop()
    engine = Engine(Recorded(), max_batch=4, prefill_chunk=4)

    def job(n_prompt, n_new):
        j = Job(list(range(2, 2 + n_prompt)), n_new, 0.0, 0, 1.0, 0, TextStream(model.tokenizer), loop,
                asyncio.Queue())
        j.cache = model.new_cache(n_prompt + n_new)  # (as Engine.run admits it)
        return j
    a, b, c, d = job(6, 9), job(3, 2), job(2, 3), job(2, 3)
    engine.active = [a]
    engine.step()  # a admitted: its first chunk alone
    engine.step()  # the rest of its prompt: its first token
    engine.step()  # a decodes
    engine.active.append(b)
    engine.step()  # b admitted: its chunk alone, a waits
    engine.step()  # both advance: a decodes, b decodes its second token and is done
    engine.active.append(c)
    engine.step()  # c admitted alone
    engine.active.append(d)
    engine.step()  # d arrives right after an admission: it joins a step of all (never two admissions in a row)
    loop.close()
    assert fed == [[4], [2], [1], [3], [1, 1], [2], [1, 1, 2]]
    assert len(a.tokens) == 4 and b.done and len(b.tokens) == 2 and len(c.tokens) == 2 and len(d.tokens) == 1
    assert engine.active == [a, c, d]


def test_warm_up_compiles_the_engine_steps(tmp_path):
    """serve.warm_up_steps runs forward_batch over 1, 16 and a prompt chunk of tokens: afterwards steps of lone tokens,
    of a few streams and of prompt chunks call no kernel that was not loaded (the server's first requests never wait
    on numba), and nothing of generate's one-token step is compiled for it."""
    c = tiny_config(max_seq_len=CTX, quant={"scheme": "ternary"}, dim=64, ffn_dim=128, n_heads=4, n_kv_heads=2,
                    head_dim=16)
    path = save_random_model(tmp_path / "m", c, seed=5)
    code = ("import numba, tinybit\nfrom tinybit import kernels, linear, serve\n"
            "def loaded():\n"
            "    return {n: len(f.signatures) for mod in (kernels, linear) for n, f in vars(mod).items()\n"
            "            if isinstance(f, numba.core.dispatcher.Dispatcher) and f.signatures}\n"
            f"m = tinybit.load({str(path)!r}, threads=1)\n"
            "serve.warm_up_steps(m, 64)\nwarm = loaded()\n"
            "for n in (1, 3, 16, 30, 64):\n"
            "    m.forward_batch([[5] * n, [6]], [m.new_cache(n), m.new_cache(1)])\n"
            "print(warm == loaded(), 'attention_step' in warm)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["True", "False"]
