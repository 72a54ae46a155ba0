"""The HTTP API: routes, the error middleware and request parsing, streaming as server-sent events.

Handlers find the server's `State` (model, scheduler, live configuration) at `app["state"]`; the process
around them (socket, loading, signals, drain) is `nextn.server.app`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestPayloadError

from nextn.errors import NextnError, Overloaded, RequestError
from nextn.server import metrics, openai_api

if TYPE_CHECKING:
    from nextn.server.app import State

log = logging.getLogger("nextn.server")


def _error(err: Exception, status: int) -> web.Response:
    return web.json_response(openai_api.error_body(err, status), status=status)


@web.middleware
async def error_middleware(request, handler):
    try:
        return await handler(request)
    except NextnError as e:
        return _error(e, e.http_status)
    except web.HTTPException as e:  # aiohttp's own (404, 405, 413 ...) in the OpenAI shape
        if e.status < 400:
            raise
        return _error(RequestError(e.reason), e.status)
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception as e:
        log.exception("unhandled error in %s", request.path)
        return _error(e, 500)


async def read_json(request, limit: int, timeout: float = 30.0):
    """The body parsed as JSON; 413 over `limit` bytes (checked while reading, Content-Length or not)."""
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    data = bytearray()
    while True:
        try:
            # a client that stops sending mid-body does not hold a connection (and a handler) open for ever
            chunk = await asyncio.wait_for(request.content.read(65536), timeout)
        except asyncio.TimeoutError:
            raise web.HTTPRequestTimeout(reason=f"no body bytes for {timeout:g} s (limits.body_timeout)") from None
        except (RequestPayloadError, http_exceptions.HttpProcessingError) as e:  # e.g. not the gzip it claims
            raise RequestError(f"the body cannot be read: {e}") from None
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
        None, lambda: state.runner.tokenizer.encode(body["content"], add_special=add_special,
                                                    parse_special=parse_special))  # off the event loop
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
    # the chat template and the tokenizer run off the event loop: a long prompt must not stall every stream
    p = await asyncio.get_running_loop().run_in_executor(None, parse, body, state.runner.tokenizer, cfg.sampling,
                                                         cfg.limits)
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
    app.router.add_get("/health", health)
    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/models", models)
    app.router.add_get("/slots", slots)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/completions", completions)
    return app
