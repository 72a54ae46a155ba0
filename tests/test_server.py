"""`nextn serve` as a subprocess on a temporary Unix socket, driven by the openai client, curl and raw sockets."""

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from nextn.devtools.tiny import make_tiny


def _short_dir():
    # Unix socket paths are limited to 108 bytes; pytest's tmp_path can be longer
    return Path(tempfile.mkdtemp(prefix="nx", dir="/tmp"))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("srv") / "m.gguf", arch="qwen3", qtype="Q8_0", seed=2)


class Served(subprocess.Popen):
    """A `nextn serve` process whose log goes to a temporary file; communicate() returns it as stderr. A pipe
    that nobody reads while the test runs fills at 64 KiB (a few thousand request lines) and then the server
    blocks writing its log: the long API fuzz stalled that way after about 3,000 requests."""

    def __init__(self, args, env):
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (lives as long as the process object)
        super().__init__(args, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)

    def communicate(self, input=None, timeout=None):
        out, _ = super().communicate(input, timeout)
        self.log.seek(0)
        return out, self.log.read()


def start(model, sock, *extra, env=None, wait=True):
    p = Served([sys.executable, "-m", "nextn", "serve", "-m", str(model), "--socket", str(sock), "-np", "4", "-c",
                "256", "-b", "64", "--max-queue", "32", *map(str, extra)], env=env or os.environ.copy())
    if wait:
        wait_ready(sock, p)
    return p


def wait_ready(sock, proc=None, timeout=120):
    # generous: a cold kernel cache compiles every program at start, minutes on a loaded 2-core machine (the
    # makepkg check() runs this suite while the package builds); a ready server returns at once
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {proc.communicate()[1]}")
        try:
            if http(sock).get("/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError("server did not become ready")


def http(sock, timeout=30):
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://nextn", timeout=timeout)


def stop(p, timeout=20):
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=timeout)
    return p.returncode, err


@pytest.fixture(scope="module")
def server(model):
    d = _short_dir()
    sock = d / "s.sock"
    p = start(model, sock)
    yield sock
    rc, err = stop(p)
    assert rc == 0, err
    assert not sock.exists()  # removed on a clean exit
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def oai(server):
    import openai

    return openai.OpenAI(base_url="http://nextn/v1", api_key="none",
                         http_client=httpx.Client(transport=httpx.HTTPTransport(uds=str(server))))


def test_openai_client_chat_completions_and_stream(oai):
    r = oai.chat.completions.create(model="x", messages=[{"role": "user", "content": "hello"}], max_tokens=8,
                                    temperature=0)
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 8
    assert r.model_extra["timings"]["draft_n"] == 0 and r.model_extra["timings"]["draft_n_accepted"] == 0
    stream = oai.chat.completions.create(model="x", messages=[{"role": "user", "content": "hello"}], max_tokens=8,
                                         temperature=0, stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == text and finish == r.choices[0].finish_reason
    assert usage.completion_tokens == r.usage.completion_tokens


def test_openai_client_completions_models_and_logprobs(oai):
    r = oai.completions.create(model="x", prompt="The sky is", max_tokens=6, temperature=0, logprobs=2)
    assert r.object == "text_completion" and r.usage.prompt_tokens > 0
    assert len(r.choices[0].logprobs.tokens) == r.usage.completion_tokens
    s = "".join(c.choices[0].text for c in oai.completions.create(
        model="x", prompt="The sky is", max_tokens=6, temperature=0, stream=True))
    assert s == r.choices[0].text
    models = oai.models.list()
    assert models.data[0].id == "m.gguf"
    r = oai.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                    temperature=0, logprobs=True, top_logprobs=2)
    assert len(r.choices[0].logprobs.content[0].top_logprobs) == 2


def test_openai_client_errors(oai):
    import openai

    with pytest.raises(openai.BadRequestError, match="top_p"):
        oai.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], top_p=2.0)
    with pytest.raises(openai.BadRequestError, match="context holds 256"):
        oai.completions.create(model="x", prompt="word " * 400, max_tokens=2)


def curl(sock, path, data=None, *args):
    cmd = ["curl", "-sS", "--unix-socket", str(sock), f"http://localhost{path}", "-w", "\n%{http_code}", *args]
    if data is not None:
        cmd += ["-H", "Content-Type: application/json", "-d", data if isinstance(data, str) else json.dumps(data)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
    body, _, code = out.rpartition("\n")
    return int(code), body


def test_curl_endpoints(server):
    assert curl(server, "/health") == (200, '{"status": "ok"}')
    code, body = curl(server, "/v1/completions", {"prompt": "hi", "max_tokens": 4, "temperature": 0, "stream": True},
                      "-N")
    assert code == 200 and body.rstrip().endswith("data: [DONE]")
    events = [json.loads(l[6:]) for l in body.splitlines() if l.startswith("data: {")]
    assert events[-1]["choices"][0]["finish_reason"] and "timings" in events[-1]
    code, body = curl(server, "/tokenize", {"content": "hello"})
    toks = json.loads(body)["tokens"]
    assert code == 200 and toks
    code, body = curl(server, "/detokenize", {"tokens": toks})
    assert json.loads(body)["content"] == "hello"
    code, body = curl(server, "/metrics")
    assert code == 200
    for name in ("nextn_requests_total", "nextn_prompt_tokens_total", "nextn_predicted_tokens_total",
                 "nextn_predicted_tokens_per_second", "nextn_queue_depth", "nextn_slots_busy",
                 "nextn_tokens_drafted_total", "nextn_tokens_drafted_accepted_total"):
        assert f"\n{name} " in body
    code, body = curl(server, "/slots")
    assert code == 200 and len(json.loads(body)) == 4
    code, body = curl(server, "/nope")
    assert code == 404 and json.loads(body)["error"]["code"] == 404


def raw(sock, data: bytes, shut=False, timeout=10) -> bytes:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(str(sock))
    s.sendall(data)
    if shut:
        s.shutdown(socket.SHUT_WR)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except socket.timeout:
        pass
    s.close()
    return out


def post(path, body: bytes, extra=b""):
    return (b"POST " + path + b" HTTP/1.1\r\nHost: anything\r\nContent-Type: application/json\r\n" + extra +
            b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, b"not valid JSON"),
    (b"[1, 2]", 400, b"JSON object"),
    (b'{"messages": "hi"}', 400, b"'messages' is required"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}', 400, b"'max_tokens'"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', 400, b"'stream'"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_k": 1.5}', 400, b"'top_k'"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stop": [1]}', 400, b"'stop'"),
    (b'{"messages": [{"role": 1}]}', 400, b"messages[0]"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}', 400, b"n = 1"),
    (b'\xff\xfe', 400, b"not valid JSON"),
    # issue 14 items 6 and 16: these were 500s, or silently ignored with a 200
    (b"[" * 1000 + b"]" * 1000, 400, b"nested too deeply"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "seed": ' + b"9" * 5000 + b"}", 400, b"not valid JSON"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"messages": []}}', 400,
     b"may not set 'messages'"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"add_generation_prompt": false}}',
     400, b"may not set 'add_generation_prompt'"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}', 400, b"'tools'"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}', 400,
     b"'response_format'"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": 100}}', 400, b"'logit_bias'"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "speculative.p_min": Infinity}', 400, b"speculative.p_min"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "speculative.n_max": -Infinity}', 400, b"speculative.n_max"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "speculative.n_min": NaN}', 400, b"speculative.n_min"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, b"temperature"),
    (b'{"a":' * 1000 + b"1" + b"}" * 1000, 400, b"nested too deeply"),
    # issue 14 item 5: 20,000 stop strings made a concurrent request 30x slower
    (b'{"messages": [{"role": "user", "content": "hi"}], "stop": [' + b",".join([b'"x"'] * 17) + b"]}", 400,
     b"at most 16"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stop": "' + b"y" * 300 + b'"}', 400,
     b"longer than 256"),
])
def test_raw_malformed_requests(server, body, status, message):
    out = raw(server, post(b"/v1/chat/completions", body))
    assert out.startswith(f"HTTP/1.1 {status}".encode()), out[:200]
    assert message in out and b'"invalid_request_error"' in out


def test_huge_body_is_413_and_bad_http_is_400(server):
    # the server answers 413 without reading the rest; the short timeout stops waiting for it to close
    out = raw(server, post(b"/v1/completions", b'{"prompt": "' + b"a" * (5 << 20) + b'"}'), timeout=1)
    assert out.startswith(b"HTTP/1.1 413"), out[:200]
    big = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n"
    assert raw(server, big, timeout=1).startswith(b"HTTP/1.1 413")
    assert raw(server, b"GARBAGE\r\n\r\n").split(b"\r\n")[0].endswith(b" 400 Bad Request")  # aiohttp answers the parser error


def test_a_body_that_is_not_the_gzip_it_claims_is_400(server):
    out = raw(server, post(b"/v1/completions", b"not gzip at all", b"Content-Encoding: gzip\r\n"))
    assert out.startswith(b"HTTP/1.1 400"), out[:200]
    assert b'"invalid_request_error"' in out
    # aiohttp drops the connection after it: a keep-alive client must be told, or it reuses it and gets a reset
    # (the API fuzzer found this)
    keep = post(b"/v1/completions", b"not deflate", b"Content-Encoding: deflate\r\n").replace(b"Connection: close",
                                                                                               b"Connection: keep-alive")
    out = raw(server, keep, timeout=3)
    assert out.startswith(b"HTTP/1.1 400") and b"connection: close" in out.lower(), out[:300]


BAD_HTTP = [  # (bytes, status): each got aiohttp's plain-text answer, or was served (unknown Content-Encoding)
    (b"GARBAGE\r\n\r\n", 400),
    (b"FOO /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n", 405),  # llhttp refuses methods it does not know
    (b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n", 400),
    (b"GET /health HTTP/1.1\r\nHost x\r\n\r\n", 400),
    (b"GET /health HTTP/1.1\r\nX: " + b"a" * 100000 + b"\r\n\r\n", 400),
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400),
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n", 400),
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
     400),
    (b"GET /he\x00alth HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),  # TLS on the plain socket
    (post(b"/v1/completions", b'{"prompt": "x"}', b"Content-Encoding: foo\r\n"), 415),  # was served as if identity
    (post(b"/v1/completions", b'{"prompt": "x"}', b"Content-Encoding: gzip, gzip\r\n"), 415),
    (post(b"/v1/completions", b"not brotli", b"Content-Encoding: br\r\n"), 4),  # 415 without Brotli, else 400
    (post(b"/v1/completions", b"not zstd", b"Content-Encoding: zstd\r\n"), 4),
    (post(b"/v1/completions", b"not deflate", b"Content-Encoding: deflate\r\n"), 400),
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-banana\r\nContent-Length: 2\r\n\r\n{}", 417),
]


def test_unparseable_http_gets_an_openai_error_and_no_traceback(model):
    """Issue 14 item 6: what aiohttp answers before any route runs (its parser's errors, an unknown method, a
    body encoding it cannot decode, an unknown Expect) was plain text with a traceback in the log per request."""
    d = _short_dir()
    p = start(model, d / "s.sock")
    try:
        for data, status in BAD_HTTP:
            out = raw(d / "s.sock", data, timeout=5)
            head, _, body = out.partition(b"\r\n\r\n")
            code = int(head.split(b" ")[1])
            assert code == status or (status == 4 and 400 <= code < 500), (data[:60], out[:300])
            assert b"content-type: application/json" in head.lower(), (data[:60], out[:300])
            err = json.loads(body)["error"]
            assert err["code"] == code and err["type"] == "invalid_request_error" and err["message"], err
        assert http(d / "s.sock").get("/health").status_code == 200
        # Expect: 100-continue still works
        out = raw(d / "s.sock", post(b"/tokenize", b'{"content": "hi"}', b"Expect: 100-continue\r\n"))
        assert out.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200"), out[:200]
    finally:
        rc, err = stop(p)
    assert rc == 0 and "Traceback" not in err and "Error handling request" not in err, err[-3000:]
    shutil.rmtree(d, ignore_errors=True)


def test_a_long_prompt_does_not_stall_the_event_loop(server, model):
    """Issue 14 item 5: the tokenizers library holds the GIL for a whole text, so a 2 MB prompt stopped /health
    and every stream for ~7 s although it was tokenized in a thread; long texts now go to a worker process."""
    from nextn.gguf.model_file import ModelFile
    from nextn.tokenizer import Tokenizer

    text = "".join(random.Random(5).choice(["hello ", "world", "!", "\n", " 42", "été", "a" * 50]) for _ in range(4000))
    want = Tokenizer.from_metadata(ModelFile(model).meta).encode(text, add_special=False, parse_special=True)
    r = http(server).post("/tokenize", json={"content": text})
    assert r.status_code == 200 and r.json()["tokens"] == want  # the worker encodes as the server would
    lat, done = [], threading.Event()

    def poll():
        with http(server) as c:
            while not done.is_set():
                t = time.perf_counter()
                assert c.get("/health").status_code == 200
                lat.append(time.perf_counter() - t)
                time.sleep(0.01)

    t = threading.Thread(target=poll)
    t.start()
    r = http(server, timeout=300).post("/v1/completions", json={"prompt": "a" * (2 << 20), "max_tokens": 1})
    done.set()
    t.join()
    assert r.status_code == 400 and "the context holds 256" in r.json()["error"]["message"]
    assert len(lat) > 20 and max(lat) < 1.5, (len(lat), max(lat))


def test_half_sent_request_does_not_hurt_the_server(server):
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(server))
    s.sendall(post(b"/v1/completions", b'{"prompt": "hello", "max_tokens": 4}')[:-10])  # body cut short
    s.close()
    s2 = socket.socket(socket.AF_UNIX)
    s2.connect(str(server))
    s2.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")  # headers cut short
    s2.close()
    assert http(server).get("/health").status_code == 200
    r = http(server).post("/v1/completions", json={"prompt": "hello", "max_tokens": 4})
    assert r.status_code == 200


def test_16_concurrent_streams_with_random_disconnects(server):
    rng = random.Random(0)
    quitters = set(rng.sample(range(16), 6))
    results, errors = {}, []

    def client(i):
        try:
            with http(server, timeout=60) as c:
                body = {"prompt": f"client {i} says", "max_tokens": 40, "temperature": 0, "stream": True,
                        "ignore_eos": True}
                with c.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    n = 0
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            n += 1
                            if i in quitters and n == 3:
                                return  # closes the connection mid-stream
                        if line == "data: [DONE]":
                            results[i] = n
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors
    assert set(results) == set(range(16)) - quitters
    deadline = time.time() + 5
    while time.time() < deadline:
        slots = http(server).get("/slots").json()
        if not any(s["is_processing"] for s in slots):
            break
        time.sleep(0.05)
    assert not any(s["is_processing"] for s in slots)
    m = http(server).get("/metrics").text
    assert "nextn_slots_busy 0" in m and "nextn_queue_depth 0" in m
    assert float(m.split("\nnextn_requests_cancelled_total ")[1].split()[0]) >= 1


def test_stale_socket_replaced_live_socket_not_stolen(model, server):
    d = _short_dir()
    stale = d / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # a socket file nobody listens on, as a crash leaves it
    p = start(model, stale)
    assert (stale.stat().st_mode & 0o777) == 0o660
    rc, err = stop(p)
    assert rc == 0, err
    p = start(model, server, wait=False)
    _, err = p.communicate(timeout=30)
    assert p.returncode != 0 and "another server is listening" in err
    assert http(server).get("/health").status_code == 200
    shutil.rmtree(d, ignore_errors=True)


def test_health_503_while_loading_and_bad_model(model, tmp_path):
    d = _short_dir()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    p = start(bad, d / "s.sock", wait=False)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 65 and "nextn: error" in err
    shutil.rmtree(d, ignore_errors=True)


def test_a_configured_device_that_is_missing_is_an_error_not_a_fallback(model):
    """Issue 14 item 12: the log names the device a server uses; a device named in the configuration that is not
    there ends the start with EX_UNAVAILABLE (69) and the list of what there is, instead of using another."""
    d = _short_dir()
    p = start(model, d / "s.sock", wait=False)
    wait_ready(d / "s.sock", p)
    rc, err = stop(p)
    assert rc == 0 and re.search(r"nextn\.build: device: .+ \(.+, .+, [0-9.]+ GiB\)", err), err[-2000:]
    p = start(model, d / "s2.sock", "--device", "no-such-gpu", wait=False)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 69, err[-2000:]
    assert "no OpenCL device matches platform=None device='no-such-gpu' (available: platform 0" in err
    assert "Traceback" not in err
    shutil.rmtree(d, ignore_errors=True)


def notify_listener(d):
    path = d / "notify"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(0.2)
    msgs = []

    def read_until(pred, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(pred(m) for m in msgs):
                return True
            try:
                msgs.append(s.recv(4096).decode())
            except socket.timeout:
                pass
        return False

    return path, msgs, read_until


def test_sd_notify_ready_watchdog_stopping_and_sighup(model):
    d = _short_dir()
    path, msgs, read_until = notify_listener(d)
    cfg = d / "c.toml"
    cfg.write_text("[log]\nlevel = 'info'\n")
    env = dict(os.environ, NOTIFY_SOCKET=str(path), WATCHDOG_USEC="200000")
    p = start(model, d / "s.sock", "--config", cfg, env=env, wait=False)
    assert read_until(lambda m: "READY=1" in m)
    assert any("STATUS=loading" in m for m in msgs)
    assert any(re.search(r"STATUS=loading \S+: 100%", m) for m in msgs)  # the load's progress (systemctl status)
    assert read_until(lambda m: "WATCHDOG=1" in m, timeout=5)
    h = http(d / "s.sock")
    assert h.get("/health").status_code == 200
    cfg.write_text("[limits]\nmax_tokens = 3\n[server]\ndrain_timeout = 5.0\n")
    p.send_signal(signal.SIGHUP)
    assert read_until(lambda m: "configuration reloaded" in m, timeout=10)
    r = h.post("/v1/completions", json={"prompt": "hi", "max_tokens": 50, "ignore_eos": True}).json()
    assert r["usage"]["completion_tokens"] == 3  # the live limit applies
    rc, err = stop(p)
    assert rc == 0 and "server.drain_timeout change only on restart" in err
    assert read_until(lambda m: "STOPPING=1" in m, timeout=5)
    shutil.rmtree(d, ignore_errors=True)


def test_sigterm_drains_running_stream(model):
    d = _short_dir()
    p = start(model, d / "s.sock", "--drain-timeout", 30)
    got = {}

    def client():
        with http(d / "s.sock") as c, c.stream("POST", "/v1/completions", json={
                "prompt": "go", "max_tokens": 150, "ignore_eos": True, "stream": True}) as r:
            got["lines"] = [l for l in r.iter_lines() if l]

    t = threading.Thread(target=client)
    t.start()
    time.sleep(0.3)
    rc, err = stop(p)
    t.join(30)
    assert rc == 0, err
    assert got["lines"][-1] == "data: [DONE]"
    last = json.loads(got["lines"][-2][6:])
    assert last["choices"][0]["finish_reason"] == "length" and last["usage"]["completion_tokens"] == 150
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate not installed (Debian package systemd)")
def test_socket_activation(model):
    d = _short_dir()
    sock = d / "act.sock"
    p = subprocess.Popen(
        ["systemd-socket-activate", "-l", str(sock), sys.executable, "-m", "nextn", "serve", "-m", str(model),
         "-np", "2", "-c", "256", "--socket", str(d / "unused.sock")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_ready(sock, None)
        r = http(sock).post("/v1/completions", json={"prompt": "hi", "max_tokens": 3}).json()
        assert r["usage"]["completion_tokens"] <= 3
        assert not (d / "unused.sock").exists()  # it served on the passed socket, bound nothing itself
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=20)
    shutil.rmtree(d, ignore_errors=True)


def test_cli_complete_and_chat_over_the_socket(server):
    def nx(*args, stdin=""):
        return subprocess.run([sys.executable, "-m", "nextn", *args, "--socket", str(server)], input=stdin,
                              capture_output=True, text=True, timeout=60)

    r = nx("complete", "The sky is", "-n", "5", "--temp", "0")
    assert r.returncode == 0 and "tok/s" in r.stderr, r.stderr
    j = nx("complete", "The sky is", "-n", "5", "--temp", "0", "--json")
    assert json.loads(j.stdout)["choices"][0]["text"] == r.stdout[:-1]
    r = nx("chat", "-n", "4", stdin="hello\nand again\n")
    assert r.returncode == 0 and r.stderr.count(" tokens, ") == 2, r.stderr
    r = subprocess.run([sys.executable, "-m", "nextn", "complete", "x", "--socket", "/tmp/none/x.sock"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "no server socket" in r.stderr


JOURNAL_SOCKET = "/run/systemd/journal/socket"


def test_journal_logging_with_structured_fields(model):
    """Under systemd (JOURNAL_STREAM set) logs go to journald's native socket with REQUEST_ID/SLOT/token
    fields. The test plays journald: it binds the native socket path (only where no journald runs)."""
    if os.path.exists(JOURNAL_SOCKET):
        pytest.skip(f"{JOURNAL_SOCKET} exists: a real journald runs here and the test will not take its socket")
    if os.geteuid() != 0:
        pytest.skip(f"binding {JOURNAL_SOCKET} needs root")
    made = [d for d in ("/run/systemd", "/run/systemd/journal") if not os.path.isdir(d)]
    os.makedirs(os.path.dirname(JOURNAL_SOCKET), exist_ok=True)
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(JOURNAL_SOCKET)
    journal.settimeout(0.5)
    d = _short_dir()
    sock = d / "j.sock"
    p = start(model, sock, env=dict(os.environ, JOURNAL_STREAM="8:12345"))
    try:
        r = http(sock).post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200
        entries, deadline = [], time.time() + 10
        while time.time() < deadline and not any(b"REQUEST_ID=" in e for e in entries):
            try:
                entries.append(journal.recv(65536))
            except TimeoutError:
                pass
        done = [e for e in entries if b"REQUEST_ID=" in e]
        assert done, entries
        fields = dict(line.split(b"=", 1) for line in done[0].split(b"\n") if b"=" in line)
        assert fields[b"SYSLOG_IDENTIFIER"] == b"nextn" and b"MESSAGE" in fields
        assert int(fields[b"PREDICTED_TOKENS"]) == 3 and b"SLOT" in fields and b"PROMPT_TOKENS" in fields
    finally:
        stop(p)
        journal.close()
        os.unlink(JOURNAL_SOCKET)
        for d in reversed(made):  # leave the machine as it was
            os.rmdir(d)


def test_dead_scheduler_fails_health_and_stops_the_watchdog(model):
    """In-process: once the worker thread died (a SystemExit from inside a step), /health is a 503 in
    OpenAI's error shape saying so, requests are refused, and the watchdog stops pinging - it follows the
    worker's heartbeat, which an idle live worker keeps."""
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from nextn import config
    from nextn.runner import ModelRunner
    from nextn.scheduler import Scheduler
    from nextn.server.app import State, _alive
    from nextn.server.routes import make_app

    runner = ModelRunner(model, n_ctx=64, n_seq=1, n_batch=16)
    state = State(config.load(system=False), (None, None))
    state.runner, state.loading = runner, False
    state.scheduler = s = Scheduler(runner, 1)
    s.beat_every = 0.02
    s.start()
    time.sleep(0.2)
    assert _alive(state, 0.1)  # idle, beating

    async def get(path, **kw):
        async with TestClient(TestServer(make_app(state))) as c:
            r = await (c.post(path, json=kw) if kw else c.get(path))
            return r.status, await r.json()

    assert asyncio.run(get("/health")) == (200, {"status": "ok"})

    def dying_step():
        raise SystemExit(3)

    s._step = dying_step
    status, body = asyncio.run(get("/v1/completions", prompt=[1, 2, 3], max_tokens=4))
    assert status == 503 and "scheduler stopped (SystemExit: 3)" in body["error"]["message"]
    s._thread.join(5)
    status, body = asyncio.run(get("/health"))
    assert status == 503 and body["error"]["type"] == "unavailable_error"
    assert "scheduler stopped" in body["error"]["message"]
    assert not _alive(state, 0.1)
    status, body = asyncio.run(get("/v1/completions", prompt=[1, 2, 3], max_tokens=4))
    assert status == 503 and "scheduler stopped" in body["error"]["message"]


def test_dead_scheduler_exits_the_process_for_a_restart(model):
    """The worker dying (any exception, even SystemExit) ends the process with a non-zero status that the
    unit does not list in RestartPreventExitStatus=, so systemd restarts the service."""
    d = _short_dir()
    sock = d / "s.sock"
    code = ("import sys\n"
            "from nextn import scheduler\n"
            "step = scheduler.Scheduler._step\n"
            "def _step(self):\n"
            "    if self.counters.steps_total >= 3:\n"
            "        raise SystemExit(3)\n"
            "    step(self)\n"
            "scheduler.Scheduler._step = _step\n"
            "from nextn.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    p = subprocess.Popen([sys.executable, "-c", code, "serve", "-m", str(model), "--socket", str(sock), "-c", "256"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(sock, p)
        r = http(sock).post("/v1/completions", json={"prompt": "hi", "max_tokens": 20, "ignore_eos": True})
        assert r.status_code == 503 and "scheduler stopped (SystemExit: 3)" in r.json()["error"]["message"]
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 70, err
    assert "the scheduler stopped: SystemExit: 3" in err and "exiting:" in err
    unit = (Path(__file__).parent.parent / "systemd" / "nextn.service").read_text()
    assert "Restart=on-failure" in unit and "70" not in unit.split("RestartPreventExitStatus=")[1].split("\n")[0]
    shutil.rmtree(d, ignore_errors=True)


HOSTILE_REFUSED = [  # each once crashed the batch step (or the scheduler) and cut every other stream
    {"presence_penalty": -1e308}, {"frequency_penalty": -1e308}, {"repeat_penalty": 5e-324},
    {"temperature": 1e308}, {"temperature": 10**400}, {"top_k": 10**18}, {"seed": 2**64}, {"seed": -5},
    {"speculative.n_max": 10**9}, {"speculative.p_min": 1e308},
]
HOSTILE_SERVED = [  # the ends of the allowed ranges: served, and harmless to the others
    {"presence_penalty": -3.4e38}, {"frequency_penalty": 3.4e38}, {"repeat_penalty": 1e-45},
    {"repeat_penalty": 3.4e38, "presence_penalty": 3.4e38}, {"temperature": 1e-320}, {"temperature": 3.4e38},
    {"top_k": 2**31 - 1, "seed": 2**64 - 1},
]


def test_hostile_sampling_values_do_not_touch_another_stream(server):
    """While a victim streams, requests with extreme sampling values arrive: those out of llama-server's
    ranges get a 400 naming the field, those at the ends of the ranges are served; the victim's stream is
    neither cut nor changed."""
    body = {"prompt": "the victim says", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    alone = http(server).post("/v1/completions", json=body).json()["choices"][0]["text"]
    got = {}

    def victim():
        with http(server, timeout=60) as c, c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            lines = []
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    lines.append(json.loads(line[6:]))
                    got.setdefault("first", time.monotonic())
            got["lines"], got["end"] = lines, time.monotonic()

    hostiles = HOSTILE_REFUSED + HOSTILE_SERVED
    results, go = {}, threading.Event()

    def hostile(i, extra):
        with http(server) as c:
            go.wait(10)  # the victim is streaming
            r = c.post("/v1/completions", json={"prompt": f"hostile {i}", "max_tokens": 8, "temperature": 1,
                                                "ignore_eos": True, **extra})
            results[i] = (r.status_code, r.json(), time.monotonic())

    threads = [threading.Thread(target=hostile, args=(i, extra)) for i, extra in enumerate(hostiles)]
    for h in threads:
        h.start()
    t = threading.Thread(target=victim)
    t.start()
    deadline = time.monotonic() + 10
    while "first" not in got and time.monotonic() < deadline:
        time.sleep(0.001)
    go.set()
    for h in threads + [t]:
        h.join(60)
    lines = got["lines"]
    assert all("error" not in ev for ev in lines)
    assert lines[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(ev["choices"][0]["text"] for ev in lines) == alone
    for i, extra in enumerate(hostiles):
        status, reply, _ = results[i]
        if extra in HOSTILE_REFUSED:
            field = next(iter(extra))
            assert status == 400 and field in reply["error"]["message"], (extra, reply)
            assert reply["error"]["type"] == "invalid_request_error"
        else:
            assert status == 200 and reply["usage"]["completion_tokens"] == 8, (extra, reply)
    # the served ones ran beside the victim
    assert max(results[i][2] for i in range(len(HOSTILE_REFUSED), len(hostiles))) < got["end"]


def test_metrics_print_exact_values():
    """Counters print as exact integers (":g" once printed 1019871 tokens as 1.02e+06; issue 14 item 17)."""
    from types import SimpleNamespace

    from nextn.scheduler import Counters
    from nextn.server import metrics

    c = Counters(predicted_tokens_total=1019871, predicted_seconds_total=12.345678901)
    sched = SimpleNamespace(counters=c, queue_depth=lambda: 0, busy_slots=lambda: 1, n_slots=4)
    text = metrics.render(sched)
    assert "nextn_predicted_tokens_total 1019871\n" in text
    assert "nextn_predicted_seconds_total 12.345678901\n" in text
    assert "e+" not in text


def test_a_disconnecting_stream_logs_one_line_not_a_traceback(model):
    """Issue 14 item 7: a streaming client that goes away cost a 30-line traceback per disconnect."""
    d = _short_dir()
    p = start(model, d / "s.sock")
    body = json.dumps({"prompt": "hello", "max_tokens": 200, "stream": True, "ignore_eos": True}).encode()
    try:
        for _ in range(3):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(d / "s.sock"))
            s.sendall(post(b"/v1/completions", body))
            s.recv(300)  # the stream has started
            s.close()
        time.sleep(1.5)
        assert http(d / "s.sock").get("/health").status_code == 200
    finally:
        rc, err = stop(p)
    assert rc == 0 and "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if "req-" in line and "slot" in line]
    assert len([line for line in lines if "cancelled" in line]) == 3, err[-3000:]
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate not installed (Debian package systemd)")
def test_first_request_under_socket_activation_waits_for_the_load(model):
    """Issue 14 item 10: the request that activates the service waits while the model loads and is answered,
    instead of a 503 the openai client and `nextn chat` give up on."""
    d = _short_dir()
    sock = d / "act.sock"
    p = subprocess.Popen(
        ["systemd-socket-activate", "-l", str(sock), sys.executable, "-m", "nextn", "serve", "-m", str(model),
         "-np", "2", "-c", "256", "--socket", str(d / "unused.sock")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.time() + 30
        while not sock.exists() and time.time() < deadline:
            time.sleep(0.02)
        r = http(sock, timeout=300).post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] <= 3
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=20)
    shutil.rmtree(d, ignore_errors=True)


def test_a_body_that_stops_arriving_gets_a_408(model):
    """Issue 14 item 7: a half-sent body held its connection and handler open for ever."""
    d = _short_dir()
    p = start(model, d / "s.sock", "--body-timeout", "1")
    try:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(20)
        s.connect(str(d / "s.sock"))
        s.sendall(post(b"/v1/completions", b'{"prompt": "hello", "max_tokens": 4}')[:-10])  # the rest never comes
        t0 = time.time()
        out = s.recv(4096)
        s.close()
        assert out.startswith(b"HTTP/1.1 408"), out[:200]
        assert b'"invalid_request_error"' in out and b"limits.body_timeout" in out
        assert time.time() - t0 < 10
    finally:
        rc, err = stop(p)
    assert rc == 0, err
    shutil.rmtree(d, ignore_errors=True)
