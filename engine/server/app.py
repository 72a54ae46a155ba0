"""The aiohttp application and the `nextn serve` process: socket, model loading, signals, drain.

Start-up order: bind the socket first (so clients get 503 from /health instead of connection refused),
load the model and warm it in a thread, start the scheduler, then READY=1. SIGTERM: STOPPING=1, refuse
new requests, let running ones finish for drain_timeout, end the rest cleanly, exit 0. SIGHUP: re-read
the configuration and apply what can change live (log level, limits, sampling defaults).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import grp
import json
import logging
import os
import signal
import socket
import time
from pathlib import Path

from aiohttp import web

from nextn import config as configmod
from nextn.errors import ConfigError, NextnError, Overloaded, RequestError
from nextn.server import metrics, openai_api
from nextn.server import systemd as sd

log = logging.getLogger("nextn.server")


def default_socket_path() -> Path:
    if sd.under_systemd():
        return Path("/run/nextn/nextn.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/nextn-{os.getuid()}"
    return Path(runtime) / "nextn" / "nextn.sock"


def socket_path(cfg) -> Path:
    return Path(cfg.server.socket) if cfg.server.socket else default_socket_path()


def bind_unix(path: Path, mode: int, group: str) -> socket.socket:
    """Binds a listening Unix socket at `path`: replaces a stale socket file, never steals a live one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if not path.is_socket():
            raise ConfigError(f"{path} exists and is not a socket; refusing to replace it (server.socket)")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)  # left by a crashed server
        else:
            raise NextnError(f"another server is listening on {path}; stop it or choose another --socket")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)  # no window in which the socket has wider permissions
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, mode)
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            sock.close()
            raise ConfigError(f"server.socket_group = {group!r}: no such group") from None
        os.chown(path, -1, gid)
    sock.listen(128)
    return sock


class State:
    """Everything the handlers need; `cfg` is replaced on SIGHUP."""

    def __init__(self, cfg, reload_args):
        self.cfg = cfg
        self.reload_args = reload_args  # (config_file, overrides) to load the same way again
        self.runner = None
        self.scheduler = None
        self.model_name = ""
        self.loading = True
        self.stopping = False
        self.active = 0  # handlers running (drain waits for them to write their last bytes)


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


async def read_json(request, limit: int):
    """The body parsed as JSON; 413 over `limit` bytes (checked while reading, Content-Length or not)."""
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    data = bytearray()
    while True:
        chunk = await request.content.read(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(data))
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the body is not valid JSON: {e}") from None


def _ready(state: State):
    if state.loading or state.scheduler is None:
        raise Overloaded("the model is loading")
    if state.stopping:
        raise Overloaded("the server is shutting down")
    return state.scheduler


async def health(request):
    state = request.app["state"]
    if state.loading:
        return _error(Overloaded("Loading model"), 503)
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
    body = await read_json(request, state.cfg.limits.max_body_bytes)
    if not isinstance(body, dict) or not isinstance(body.get("content"), str):
        raise RequestError("'content' is required: a string")
    add_special = body.get("add_special", False)
    parse_special = body.get("parse_special", True)
    if not isinstance(add_special, bool) or not isinstance(parse_special, bool):
        raise RequestError("'add_special' and 'parse_special' must be true or false")
    tokens = state.runner.tokenizer.encode(body["content"], add_special=add_special, parse_special=parse_special)
    return web.json_response({"tokens": tokens})


async def detokenize(request):
    state = request.app["state"]
    _ready(state)
    body = await read_json(request, state.cfg.limits.max_body_bytes)
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
    sched = _ready(state)
    cfg = state.cfg
    body = await read_json(request, cfg.limits.max_body_bytes)
    parse = openai_api.parse_chat if chat else openai_api.parse_completion
    p = parse(body, state.runner.tokenizer, cfg.sampling, cfg.limits)
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
    except (ConnectionResetError, asyncio.CancelledError):
        raise
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


def _load_model(state: State) -> None:
    from nextn.cl.runtime import DeviceChoice, Runtime
    from nextn.runner import ModelRunner
    from nextn.scheduler import Scheduler
    from nextn.spec.speculator import from_config as spec_from_config

    cfg = state.cfg
    if not cfg.model.path:
        raise ConfigError("no model: set [model] path in the configuration or pass --model")

    spec = spec_from_config(cfg.speculative)
    rt = Runtime(DeviceChoice.parse(cfg.device.platform, cfg.device.device))
    # the MTP block and the rollback state are counted in the memory check before anything is uploaded
    runner = ModelRunner(cfg.model.path, rt=rt, n_ctx=cfg.model.ctx_size or None, n_seq=cfg.server.parallel,
                         n_batch=cfg.model.batch_size, mtp=spec.uses_mtp, speculative=spec.enabled)
    log.info("device memory: %s", ", ".join(f"{k.replace('_', ' ')} {v / 2**20:.1f} MiB"
                                            for k, v in runner.memory.items()))
    if spec.enabled:
        log.info("speculative decoding: %s, up to %d drafts%s%s", ",".join(spec.types), spec.n_max,
                 " (adaptive)" if spec.adaptive else "",
                 "; SYNTHETIC ACCEPTANCE: output is not valid" if spec.synthetic else "")
    runner.eval(0, [runner.tokenizer.bos_id if runner.tokenizer.bos_id is not None else 0], 0)  # warm-up
    runner.cache.truncate(0, 0)
    state.runner = runner
    state.model_name = Path(cfg.model.path).name
    draft = None
    if spec.uses_draft_model:
        draft = ModelRunner(spec.draft_model, rt=rt, n_ctx=runner.n_ctx, n_seq=cfg.server.parallel,
                            n_batch=cfg.model.batch_size)
        log.info("draft model %s: %.1f MiB", Path(spec.draft_model).name, draft.memory.total / 2**20)
    state.scheduler = Scheduler(runner, cfg.server.parallel, cfg.server.max_queue, spec=spec, draft_runner=draft)
    state.scheduler.start()


def _reload(state: State) -> None:
    try:
        new = configmod.load(*state.reload_args)
    except ConfigError as e:
        log.error("reload failed, keeping the old configuration: %s", e)
        sd.notify("STATUS=reload failed: " + str(e)[:200])
        return
    old = state.cfg
    live = set(old.live_keys())
    changed = [k for k, _ in configmod.iter_fields() if old.get(k) != new.get(k)]
    ignored = [k for k in changed if k not in live]
    if ignored:
        log.warning("reload: %s change only on restart", ", ".join(ignored))
    # keep the restart-only values as they are running; take the live ones
    kept = {s: getattr(old, s) for s in ("server", "model", "device")}
    state.cfg = dataclasses.replace(new, **kept)
    sd.set_level(state.cfg.log.level)
    if state.scheduler is not None:
        state.scheduler.max_queue = state.cfg.server.max_queue if "server.max_queue" in live else state.scheduler.max_queue
    log.info("configuration reloaded (%s)", ", ".join(k for k in changed if k in live) or "no live changes")
    sd.notify("READY=1", "STATUS=configuration reloaded")


async def _watchdog(state: State, interval: float) -> None:
    while True:
        # ping only while the worker makes progress: a step stuck for several intervals means a hung device,
        # and the missing ping lets systemd restart the service
        if state.scheduler is None or state.scheduler.seconds_since_step() < 4 * interval:
            sd.notify("WATCHDOG=1")
        await asyncio.sleep(interval)


async def _status(state: State) -> None:
    while True:
        await asyncio.sleep(5)
        s = state.scheduler
        if s is not None and not state.stopping:
            sd.notify(f"STATUS=serving {state.model_name}: {s.busy_slots()}/{s.n_slots} slots busy, "
                      f"{s.queue_depth()} queued, {s.counters.requests_total} requests done")


async def run_server(cfg, reload_args=(None, None), sockets: list[socket.socket] | None = None,
                     ready: asyncio.Event | None = None) -> int:
    state = State(cfg, reload_args)
    app = make_app(state)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    sites = []
    for sock in sockets or []:
        sites.append(web.SockSite(runner, sock))
    if cfg.server.tcp:
        host, port = cfg.server.tcp.rsplit(":", 1)
        sites.append(web.TCPSite(runner, host, int(port)))
    for site in sites:
        await site.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, state)
    tasks = [asyncio.create_task(_status(state))]
    interval = sd.watchdog_interval()
    if interval:
        tasks.append(asyncio.create_task(_watchdog(state, interval)))
    sd.notify(f"STATUS=loading {cfg.model.path}")
    log.info("listening on %s; loading %s", ", ".join(str(s.name) for s in sites), cfg.model.path)
    try:
        load = loop.run_in_executor(None, _load_model, state)
        done, _ = await asyncio.wait([load, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        if load in done:
            load.result()  # a load error ends the process with its exit code
            state.loading = False
            r = state.runner
            msg = (f"serving {state.model_name} ({r.n_ctx} ctx, {state.scheduler.n_slots} slots) "
                   f"loaded in {r.load_seconds:.1f} s")
            log.info(msg)
            sd.notify("READY=1", "STATUS=" + msg)
            if ready is not None:
                ready.set()
            await stop.wait()
        state.stopping = True
        sd.notify("STOPPING=1", "STATUS=draining")
        log.info("stopping: draining for up to %.0f s", cfg.server.drain_timeout)
        if state.scheduler is not None:
            clean = await loop.run_in_executor(None, state.scheduler.drain, state.cfg.server.drain_timeout)
            if not clean:
                log.warning("drain timeout: unfinished requests were ended")
        deadline = time.monotonic() + 5
        while state.active and time.monotonic() < deadline:  # let handlers write their last chunks
            await asyncio.sleep(0.02)
        return 0
    finally:
        for t in tasks:
            t.cancel()
        await runner.cleanup()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


def serve(cfg, reload_args=(None, None)) -> int:
    """`nextn serve`: returns the exit status."""
    sd.setup_logging(cfg.log.level)
    sockets = sd.listen_sockets()
    path = None
    if not sockets:
        path = socket_path(cfg)
        try:
            sockets = [bind_unix(path, configmod.socket_mode(cfg), cfg.server.socket_group)]
        except OSError as e:
            raise ConfigError(f"cannot listen on {path}: {os.strerror(e.errno or errno.EIO)} (server.socket)") from None
    try:
        return asyncio.run(run_server(cfg, reload_args, sockets))
    finally:
        if path is not None:
            try:
                if path.is_socket():
                    path.unlink()
            except OSError:
                pass
