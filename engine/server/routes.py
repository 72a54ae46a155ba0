"""The HTTP API: routes, the error middleware and request parsing, streaming as server-sent events.

Handlers find the server's `State` (model, scheduler, live configuration) at `app["state"]`; the process
around them (socket, loading, signals, drain) is `nextn.server.app`.
"""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import re
import time
from typing import TYPE_CHECKING

from aiohttp import HttpVersion11, hdrs, http_exceptions, web, web_protocol
from aiohttp.web_protocol import RequestPayloadError

from nextn.errors import NextnError, Overloaded, RequestError
from nextn.server import metrics, openai_api

if TYPE_CHECKING:
    from nextn.server.app import State

log = logging.getLogger("nextn.server")


def _error(err: Exception, status: int) -> web.Response:
    return web.json_response(openai_api.error_body(err, status), status=status)


def _http_message(e: BaseException) -> str:
    """aiohttp's parser message on one line: 'Invalid header token: b'Host x'' (its caret lines dropped)."""
    while not isinstance(e, http_exceptions.HttpProcessingError) and isinstance(e.__cause__, Exception):
        e = e.__cause__  # a payload error wraps the decoder's
    text = e.message if isinstance(e, http_exceptions.HttpProcessingError) and e.message else str(e)
    return " ".join(w for w in (line.strip() for line in str(text).splitlines()) if w.strip("^ "))[:300]


_REQUEST_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ [^ ]+ HTTP/1\.[01]")


def _unknown_method(e: http_exceptions.BadHttpMethod) -> bool:
    """A well-formed request line whose method llhttp does not know (405), not bytes that are not HTTP (400).
    llhttp's message quotes the line: "Invalid method encountered:\n\n  b'FOO / HTTP/1.1'\n     ^"."""
    for line in str(e.message).splitlines():
        line = line.strip()
        if line[:2] in ("b'", 'b"'):
            try:
                return _REQUEST_LINE.fullmatch(ast.literal_eval(line)) is not None
            except (ValueError, SyntaxError):
                return False
    return False


class _Connection(web_protocol.RequestHandler):
    """aiohttp's connection, except that what it answers before any route runs - HTTP it cannot parse, an
    unknown method, a body encoding it cannot decode - is an error in OpenAI's JSON shape (aiohttp's is plain
    text) and costs one debug line, not a traceback: any local client can send such bytes."""

    def handle_error(self, request, status=500, exc=None, message=None):
        if status >= 500:  # a handler that raised past the middleware (a bug), or timed out
            if exc is not None:
                self.log_exception("error handling a request", exc_info=exc)
            return self._json(request, status, Exception(message or "internal server error"))
        if isinstance(exc, http_exceptions.BadHttpMethod) and _unknown_method(exc):
            status = 405  # a method nobody routes (llhttp refuses the ones it does not know while parsing)
        elif isinstance(exc, http_exceptions.ContentEncodingError):
            status = 415  # a Content-Encoding this server cannot decode (br / zstd without their library)
        err = RequestError(_http_message(exc) if exc is not None else (message or "bad request"))
        log.debug("HTTP %d before routing: %s", status, err)
        return self._json(request, status, err)

    def log_exception(self, *args, exc_info=None, **kw):
        if isinstance(exc_info, RequestPayloadError):  # a body that cannot be decoded, answered with a 400:
            log.debug("the rest of a body that cannot be decoded: %s", _http_message(exc_info))  # aiohttp's
            return  # read of the rest after the response fails the same way
        super().log_exception(*args, exc_info=exc_info, **kw)

    def _json(self, request, status, err):
        if request.writer.output_size > 0:  # a response has begun: the connection can only be closed
            raise ConnectionError("a response was already sent, cannot send an error")
        resp = _error(err, status)
        resp.force_close()
        return resp


class _Server(web.Server):
    def __call__(self) -> web_protocol.RequestHandler:
        return _Connection(self, loop=self._loop, **self._kwargs)


class AppRunner(web.AppRunner):
    """web.AppRunner whose connections are `_Connection`s (aiohttp has no public hook for its parser errors)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server  # the same object; only the connections it makes differ
        return server


async def _expect(request):
    """`Expect: 100-continue` as aiohttp answers it; any other expectation is a 417 in OpenAI's shape."""
    expect = request.headers.get(hdrs.EXPECT, "")
    if request.version == HttpVersion11:
        if expect.lower() != "100-continue":
            raise web.HTTPExpectationFailed(text=json.dumps(openai_api.error_body(
                RequestError(f"unknown Expect: {expect[:100]}"), 417)), content_type="application/json")
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the response proper has not begun


@web.middleware
async def error_middleware(request, handler):
    try:
        return await handler(request)
    except NextnError as e:
        resp = _error(e, e.http_status)
        if request.content.exception() is not None:  # a body that cannot be decoded: the connection cannot
            resp.force_close()  # go on (aiohttp drops it), so say so (Connection: close) before a client reuses it
        return resp
    except web.HTTPException as e:  # aiohttp's own (404, 405, 413 ...) in the OpenAI shape
        if e.status < 400:
            raise
        return _error(RequestError(e.reason), e.status)
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception as e:
        log.exception("unhandled error in %s", request.path)
        return _error(e, 500)


DECODED_ENCODINGS = ("identity", "gzip", "deflate", "br", "zstd")  # what aiohttp decodes (br, zstd: with their library)


class UnsupportedEncoding(RequestError):
    http_status = 415


async def read_json(request, limit: int, timeout: float = 30.0):
    """The body parsed as JSON; 413 over `limit` bytes (checked while reading, Content-Length or not)."""
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    encoding = request.headers.get(hdrs.CONTENT_ENCODING, "identity").strip().lower()
    if encoding not in DECODED_ENCODINGS:  # aiohttp would hand the coded bytes on as they came
        raise UnsupportedEncoding(f"Content-Encoding {encoding[:50]!r} is not supported: send the body "
                                  f"uncompressed or as gzip or deflate")
    data = bytearray()
    while True:
        try:
            # a client that stops sending mid-body does not hold a connection (and a handler) open for ever
            chunk = await asyncio.wait_for(request.content.read(65536), timeout)
        except asyncio.TimeoutError:
            raise web.HTTPRequestTimeout(reason=f"no body bytes for {timeout:g} s (limits.body_timeout)") from None
        except (RequestPayloadError, http_exceptions.HttpProcessingError) as e:  # e.g. not the gzip it claims
            raise RequestError(f"the body cannot be read: {_http_message(e)}") from None
        if not chunk:
            break
        data += chunk
        if len(data) > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(data))
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the body is not valid JSON: {e}") from None
    except RecursionError:
        raise RequestError("the body is not valid JSON: nested too deeply") from None
    except ValueError as e:  # an integer longer than Python's digit limit
        raise RequestError(f"the body is not valid JSON: {e}") from None


LOAD_WAIT_SECONDS = 300  # how long a request waits for the model to load before a 503 (socket activation)


async def _loaded(state: State):
    """The scheduler once the model is loaded: a request that arrives while it loads (the first one, under
    socket activation, is what started the service) waits for it, up to LOAD_WAIT_SECONDS, instead of a 503."""
    deadline = time.monotonic() + LOAD_WAIT_SECONDS
    while state.loading and not state.stopping and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return _ready(state)


def _ready(state: State):
    if state.loading or state.scheduler is None:
        raise Overloaded("the model is loading")
    if state.scheduler.failure is not None:
        raise Overloaded(state.scheduler.stopped_reason())
    if state.stopping:
        raise Overloaded("the server is shutting down")
    return state.scheduler


async def health(request):
    state = request.app["state"]
    if state.loading:
        return _error(Overloaded("Loading model"), 503)
    if state.scheduler is not None and state.scheduler.failure is not None:
        return _error(Overloaded(state.scheduler.stopped_reason()), 503)  # nothing would answer a request
    if state.stopping:
        return _error(Overloaded("shutting down"), 503)
    return web.json_response({"status": "ok"})


async def models(request):
    state = request.app["state"]
    data = []
    if state.runner is not None:
        r = state.runner
        data.append({"id": state.model_name, "object": "model", "created": int(time.time()), "owned_by": "nextn",
                     "meta": {"n_ctx": r.n_ctx, "n_vocab": r.n_vocab, "n_slots": state.scheduler.n_slots}})
    return web.json_response({"object": "list", "data": data})


async def slots(request):
    return web.json_response(_ready(request.app["state"]).slots_info())


async def metrics_handler(request):
    sched = _ready(request.app["state"])
    return web.Response(text=metrics.render(sched), content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Version": "0.0.4"})


async def tokenize(request):
    state = request.app["state"]
    _ready(state)
    body = await read_json(request, state.cfg.limits.max_body_bytes, state.cfg.limits.body_timeout)
    if not isinstance(body, dict) or not isinstance(body.get("content"), str):
        raise RequestError("'content' is required: a string")
    add_special = body.get("add_special", False)
    parse_special = body.get("parse_special", True)
    if not isinstance(add_special, bool) or not isinstance(parse_special, bool):
        raise RequestError("'add_special' and 'parse_special' must be true or false")
    tokens = await asyncio.get_running_loop().run_in_executor(
        None, lambda: state.encoder.encode(body["content"], add_special=add_special,
                                           parse_special=parse_special))  # off the event loop (a long text: the GIL too)
    return web.json_response({"tokens": tokens})


async def detokenize(request):
    state = request.app["state"]
    _ready(state)
    body = await read_json(request, state.cfg.limits.max_body_bytes, state.cfg.limits.body_timeout)
    toks = body.get("tokens") if isinstance(body, dict) else None
    n_vocab = state.runner.n_vocab
    if not isinstance(toks, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < n_vocab
                                             for t in toks):
        raise RequestError(f"'tokens' is required: a list of token ids in 0..{n_vocab - 1}")
    return web.json_response({"content": state.runner.tokenizer.decode(toks)})


async def chat_completions(request):
    return await _completion(request, chat=True)


async def completions(request):
    return await _completion(request, chat=False)


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def _completion(request, chat: bool):
    from nextn.scheduler import Request

    state = request.app["state"]
    sched = await _loaded(state)
    cfg = state.cfg
    body = await read_json(request, cfg.limits.max_body_bytes, cfg.limits.body_timeout)
    parse = openai_api.parse_chat if chat else openai_api.parse_completion
    # the chat template and the tokenizer run off the event loop, a long text in a worker process (it would hold
    # the GIL): a long prompt must not stall every stream
    p = await asyncio.get_running_loop().run_in_executor(None, parse, body, state.encoder, cfg.sampling, cfg.limits)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def sink(ev):  # called on the scheduler thread
        try:
            loop.call_soon_threadsafe(events.put_nowait, ev)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    spec = state.scheduler.spec.for_request(p.spec_body) if p.spec_body else None
    req = Request(p.prompt, p.max_tokens, p.params, p.stop, p.ignore_eos, p.n_probs, sink, spec=spec)
    sched.submit(req)  # RequestError / Overloaded -> 400 / 503 through the middleware
    shaper = openai_api.Shaper(chat, state.model_name, state.runner.tokenizer)
    state.active += 1
    finished = False
    resp = None
    try:
        if not p.stream:
            text, evs = [], []
            while True:
                ev = await _next_event(request, events)
                if ev is None:  # the client left
                    return web.Response(status=499)
                if ev.kind == "token":
                    text.append(ev.text)
                    evs.append(ev)
                elif ev.kind == "error":
                    finished = True
                    raise ev.error
                else:
                    finished = True
                    return web.json_response(shaper.full("".join(text), evs, ev.finish_reason, ev.usage, ev.timings))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        if chat:
            await resp.write(_sse(shaper.chunk("", [], first=True)))
        while True:
            ev = await _next_event(request, events)
            if ev is None:
                return resp
            if ev.kind == "token":
                if ev.text or ev.logprob is not None:
                    await resp.write(_sse(shaper.chunk(ev.text, [ev])))
            elif ev.kind == "error":
                finished = True
                await resp.write(_sse(openai_api.error_body(ev.error, ev.error.http_status)))
                await resp.write(b"data: [DONE]\n\n")
                return resp
            else:
                finished = True
                last = shaper.chunk("", [], finish=ev.finish_reason)
                last["usage"], last["timings"] = ev.usage, ev.timings  # llama-server puts both on the last chunk
                await resp.write(_sse(last))
                if p.include_usage:
                    await resp.write(_sse(shaper.usage_chunk(ev.usage, ev.timings)))
                await resp.write(b"data: [DONE]\n\n")
                await resp.write_eof()
                return resp
    except ConnectionResetError:  # the client went away mid-stream: no traceback (the scheduler logs one line)
        log.debug("request %s: the client disconnected", req.id, extra={"REQUEST_ID": req.id})
        return resp if resp is not None else web.Response(status=499)
    finally:
        state.active -= 1
        if not finished:
            sched.cancel(req)  # frees the slot before the next step


async def _next_event(request, events: asyncio.Queue):
    """The next scheduler event, or None once the client has disconnected (checked every 0.25 s)."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), 0.25)
        except asyncio.TimeoutError:
            t = request.transport
            if t is None or t.is_closing():
                return None


def make_app(state: State) -> web.Application:
    # client_max_size is enforced by read_json against the live limit; aiohttp's own cap only backs it up
    app = web.Application(middlewares=[error_middleware], client_max_size=1 << 30)
    app["state"] = state
    for path, handler in (("/health", health), ("/v1/health", health), ("/v1/models", models), ("/models", models),
                          ("/slots", slots), ("/metrics", metrics_handler)):
        app.router.add_get(path, handler, expect_handler=_expect)
    for path, handler in (("/tokenize", tokenize), ("/detokenize", detokenize),
                          ("/v1/chat/completions", chat_completions), ("/chat/completions", chat_completions),
                          ("/v1/completions", completions), ("/completions", completions)):
        app.router.add_post(path, handler, expect_handler=_expect)
    return app
