"""Fuzzing the HTTP API: random and mutated bodies for every POST endpoint, sent to a real `nextn serve`.

Every answer must be JSON in OpenAI's shape with a 2xx or a 4xx status (a 200 stream: server-sent events, each
a JSON object), never a 5xx, and the server must stay healthy and log no traceback. Seeded: a failure names
the seed and the case, which `NEXTN_FUZZ_SEED=<seed>` replays. The fast suite sends a few hundred requests; the
slow one `NEXTN_FUZZ_API_N` (default 5000) from another seed.
"""

import gzip
import json
import os
import random
import shutil
import threading

import httpx
import pytest
from test_server import _short_dir, http, start, stop

from nextn.devtools.tiny import make_tiny

ENDPOINTS = ["/v1/completions", "/v1/chat/completions", "/completions", "/chat/completions", "/tokenize",
             "/detokenize"]
FIELDS = ["prompt", "messages", "max_tokens", "max_completion_tokens", "n_predict", "temperature", "top_k", "top_p",
          "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty", "seed", "stop", "stream",
          "stream_options", "logprobs", "top_logprobs", "n_probs", "ignore_eos", "chat_template_kwargs", "n",
          "model", "user", "content", "tokens", "add_special", "parse_special", "speculative.n_max",
          "speculative.n_min", "speculative.p_min", "speculative.type", "speculative.ngram_size_n",
          "speculative.ngram_size_m", "speculative.ngram_min_hits", "tools", "response_format", "logit_bias"]
# bare JSON words Python's json module reads (and json.dumps writes) that are not standard JSON
SPECIAL_NUMBERS = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1e-999", "-0", "9" * 40, "-" + "9" * 40,
                   "18446744073709551616", "2147483648", "-2147483649", "0.0000001", "1e308", "4.9e-324",
                   "9" * 5000, "[" * 3000 + "]" * 3000, '{"a":' * 1500 + "1" + "}" * 1500]
STRINGS = ["", "hello", "\u0000", "\ud800", "\udfff\ud800", "<|im_start|>", "<|im_end|>", "{{ raise_exception('x') }}",
           "{% for x in y %}", "\u202e\u0301", "\U0001f600" * 3, "a" * 300, "x\ny\r\n", "\\", "\"", "draft-mtp",
           "ngram-simple", "ngram-mod", "none", "user", "assistant", "system", "tool", "text", "\xff\xfe"]


class Raw(str):
    """A JSON fragment written as is (NaN, Infinity, integers past 64 bits)."""


def rand_value(rng, depth=0):
    k = rng.randrange(12 if depth < 3 else 8)
    if k == 0:
        return None
    if k == 1:
        return rng.choice([True, False])
    if k == 2:
        return rng.choice([0, 1, -1, 2, 3, 7, 63, 64, 255, 256, 1000, 2**31 - 1, 2**31, 2**63, -2**63, 2**64, 10**30])
    if k == 3:
        return rng.choice([0.0, -0.0, 0.5, 1.0, 1.5, -1.0, 1e-45, 3.4e38, 3.5e38, 1e308, -1e308, 5e-324])
    if k == 4:
        return Raw(rng.choice(SPECIAL_NUMBERS))
    if k in (5, 6):
        return rng.choice(STRINGS)
    if k == 7:
        return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0x800), rng.randrange(0xd800, 0xe000),
                                       rng.randrange(0x10000, 0x110000), rng.randrange(0, 32)])) for _ in range(rng.randrange(1, 12)))
    if k in (8, 9):
        return [rand_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(FIELDS + ["role", "content", "type", "text", "include_usage", "enable_thinking"]):
            rand_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def dumps(v) -> str:
    if isinstance(v, Raw):
        return str(v)
    if isinstance(v, dict):
        return "{" + ", ".join(json.dumps(k) + ": " + dumps(x) for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(dumps(x) for x in v) + "]"
    return json.dumps(v)


def valid_body(rng, path):
    if path.endswith("/tokenize"):
        return {"content": rng.choice(STRINGS), "add_special": rng.choice([True, False])}
    if path.endswith("/detokenize"):
        return {"tokens": [rng.randrange(300) for _ in range(rng.randrange(1, 8))]}
    body = {"max_tokens": rng.choice([1, 2, 4, 8, 16]), "temperature": rng.choice([0, 0.7, 1.0]),
            "stream": rng.choice([True, False])}
    if "chat" in path:
        body["messages"] = [{"role": rng.choice(["system", "user", "assistant"]), "content": rng.choice(STRINGS)}
                            for _ in range(rng.randrange(1, 4))]
    else:
        body["prompt"] = rng.choice([rng.choice(STRINGS[1:]), [rng.randrange(300) for _ in range(rng.randrange(1, 9))]])
    return body


def mutate(rng, body):
    """A body with a few fields added, replaced or removed; sometimes a nested part changed."""
    body = dict(body)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(5)
        if op == 0 and body:
            body.pop(rng.choice(list(body)))
        elif op in (1, 2):
            body[rng.choice(FIELDS)] = rand_value(rng)
        elif op == 3 and isinstance(body.get("messages"), list) and body["messages"]:
            m = rng.choice(body["messages"])
            if isinstance(m, dict):
                m[rng.choice(["role", "content", "name", "tool_calls"])] = rand_value(rng)
        else:
            key = rng.choice(list(body) or FIELDS)
            body[key] = rand_value(rng)
    if "max_tokens" in body and isinstance(body["max_tokens"], int) and body["max_tokens"] > 32:
        body["max_tokens"] = 32  # keep most requests short; huge values still arrive through n_predict and raw
    return body


def make_case(rng, i):
    """(path, body bytes, headers)"""
    path = rng.choice(ENDPOINTS)
    kind = rng.randrange(10)
    if kind == 0:  # any JSON value at all
        return path, dumps(rand_value(rng)).encode("utf-8", "surrogatepass"), {}
    text = dumps(mutate(rng, valid_body(rng, path)) if kind > 1 else valid_body(rng, path))
    data = text.encode("utf-8", "surrogatepass")
    if kind == 1:  # byte-level damage to otherwise valid JSON
        data = bytearray(data)
        for _ in range(rng.randrange(1, 4)):
            op = rng.randrange(3)
            pos = rng.randrange(len(data) + 1)
            if op == 0 and data:
                del data[pos:pos + rng.randrange(1, 4)]
            elif op == 1:
                data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4)))
            elif data:
                data[min(pos, len(data) - 1)] ^= 1 << rng.randrange(8)
        data = bytes(data)
    headers = {"Content-Type": rng.choice(["application/json", "text/plain", "application/x-www-form-urlencoded"])}
    if rng.random() < 0.05:  # a body coded, claimed to be, or both
        coding = rng.choice(["gzip", "deflate", "br", "zstd", "foo", "gzip, gzip", "identity"])
        headers["Content-Encoding"] = coding
        if coding == "gzip" and rng.random() < 0.5:
            data = gzip.compress(data)
            if rng.random() < 0.5:
                data = data[:rng.randrange(len(data))]
    return path, data, headers


def check_response(r: httpx.Response, stream_body: bytes):
    """None when the answer is well-formed, else what is wrong with it."""
    if r.status_code >= 500 or r.status_code < 200 or 300 <= r.status_code < 400:
        return f"status {r.status_code}: {stream_body[:300]!r}"
    ctype = r.headers.get("content-type", "")
    if ctype.startswith("text/event-stream"):
        if r.status_code != 200:
            return f"a stream with status {r.status_code}"
        lines = [line for line in stream_body.split(b"\n") if line]
        if not lines or lines[-1] != b"data: [DONE]":
            return f"a stream that does not end with [DONE]: {stream_body[-200:]!r}"
        for line in lines[:-1]:
            if not line.startswith(b"data: "):
                return f"a stream line that is not data: {line[:100]!r}"
            ev = json.loads(line[6:])
            if "error" in ev:
                return f"an error in a stream: {ev}"
        return None
    if not ctype.startswith("application/json"):
        return f"content-type {ctype!r}: {stream_body[:200]!r}"
    try:
        body = json.loads(stream_body)
    except ValueError:
        return f"not JSON: {stream_body[:200]!r}"
    if r.status_code >= 400:
        err = body.get("error") if isinstance(body, dict) else None
        if not (isinstance(err, dict) and isinstance(err.get("message"), str) and err.get("code") == r.status_code
                and err.get("type") == "invalid_request_error"):
            return f"not an OpenAI error: {body}"
    return None


def fuzz(sock, seed: int, n: int, threads: int = 4):
    """Sends n cases from `seed` over `threads` connections; returns (counts, failures)."""
    counts = {"tried": 0, "2xx": 0, "4xx": 0, "streams": 0, "5xx": 0, "malformed": 0}
    failures = []
    lock = threading.Lock()

    def worker(w):
        rng = random.Random(f"{seed}-{w}")
        with http(sock, timeout=60) as c:
            for i in range(w, n, threads):
                path, data, headers = make_case(rng, i)
                try:
                    with c.stream("POST", path, content=data, headers=headers) as r:
                        got = r.read()
                    problem = check_response(r, got)
                except (httpx.HTTPError, ValueError) as e:
                    r, problem = None, f"{type(e).__name__}: {e}"
                with lock:
                    counts["tried"] += 1
                    if r is not None and r.status_code >= 500:
                        counts["5xx"] += 1
                    elif problem is not None:
                        counts["malformed"] += 1
                    elif r.headers.get("content-type", "").startswith("text/event-stream"):
                        counts["streams"] += 1
                        counts["2xx"] += 1
                    else:
                        counts["2xx" if r.status_code < 300 else "4xx"] += 1
                    if problem is not None:
                        failures.append((f"seed {seed} worker {w} case {i}", path, data[:400], problem))

    ts = [threading.Thread(target=worker, args=(w,)) for w in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return counts, failures


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("fuzzapi") / "m.gguf", arch="qwen3", qtype="Q8_0", seed=2)


def run_fuzz(model, seed, n):
    d = _short_dir()
    sock = d / "s.sock"
    p = start(model, sock, "--spec-type", "ngram-simple")
    try:
        counts, failures = fuzz(sock, seed, n)
        health = http(sock).get("/health").status_code
        slots = http(sock).get("/slots").json()
    finally:
        rc, err = stop(p)
        shutil.rmtree(d, ignore_errors=True)
    tracebacks = err.count("Traceback")
    print(f"\nAPI fuzz, seed {seed}: {counts['tried']} requests: {counts['2xx']} 2xx ({counts['streams']} streams), "
          f"{counts['4xx']} 4xx, {counts['5xx']} 5xx, {counts['malformed']} malformed answers; "
          f"{tracebacks} tracebacks in the log; exit {rc}")
    for f in failures[:10]:
        print(" ", f)
    assert not failures, failures[:5]
    assert health == 200 and not any(s["is_processing"] for s in slots)
    assert rc == 0 and tracebacks == 0, err[-3000:]
    assert counts["2xx"] > 0 and counts["4xx"] > 0  # the cases reach both sides


def test_fuzz_api_bodies(model):
    run_fuzz(model, int(os.environ.get("NEXTN_FUZZ_SEED", "1")), int(os.environ.get("NEXTN_FUZZ_API_N_FAST", "300")))


@pytest.mark.slow
def test_fuzz_api_bodies_long(model):
    run_fuzz(model, int(os.environ.get("NEXTN_FUZZ_SEED", "1000")), int(os.environ.get("NEXTN_FUZZ_API_N", "5000")))
