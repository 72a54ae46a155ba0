"""The `nextn serve` process: socket, model loading, signals, drain, watchdog (routes: `nextn.server.routes`).

Start-up order: bind the socket first (so clients get 503 from /health instead of connection refused),
load the model and warm it in a thread, start the scheduler, then READY=1. SIGTERM: STOPPING=1, refuse
new requests, let running ones finish for drain_timeout, end the rest cleanly, exit 0. SIGHUP: re-read
the configuration and apply what can change live (log level, limits, sampling defaults). If the scheduler's
worker dies, /health answers 503 and the process exits with EXIT_SCHEDULER_STOPPED, which systemd restarts
(Restart=on-failure); the watchdog pings only while the worker beats.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import grp
import logging
import os
import signal
import socket
import time
from pathlib import Path

from aiohttp import web

from nextn import config as configmod
from nextn import default_model
from nextn.errors import ConfigError
from nextn.server import systemd as sd
from nextn.server.routes import AppRunner, make_app
from nextn.server.tokenize_pool import Encoder

log = logging.getLogger("nextn.server")

EXIT_SCHEDULER_STOPPED = 70  # EX_SOFTWARE: not in the unit's RestartPreventExitStatus=, so systemd restarts


def default_socket_path() -> Path:
    if sd.under_systemd():
        return Path("/run/nextn/nextn.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/nextn-{os.getuid()}"
    return Path(runtime) / "nextn" / "nextn.sock"


def socket_path(cfg) -> Path:
    return Path(cfg.server.socket) if cfg.server.socket else default_socket_path()


def private_dir(path: Path, top: Path) -> None:
    """Make the directories from `top` down to `path` (mode 0700), and refuse any of them that is a symlink, is
    not owned by this user, or is writable by others: another local user could otherwise create the default
    socket's directory first (/tmp/nextn-<uid> when XDG_RUNTIME_DIR is unset) and swap the socket, capturing
    prompts and forging completions. The checks ssh-agent and gpg-agent make."""
    import stat

    rel = path.relative_to(top)
    for d in [*reversed(rel.parents), rel][1:]:  # below top (XDG_RUNTIME_DIR, or /tmp itself)
        d = top / d
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            pass
        st = d.lstat()
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() \
                or st.st_mode & 0o022:
            raise ConfigError(f"{d} is not a private directory of this user (owner uid {st.st_uid}, mode "
                              f"{stat.S_IMODE(st.st_mode):o}): refusing to put the server's socket there; remove "
                              f"it or set server.socket / --socket")


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
            # a configuration problem (exit 78: systemd does not restart-loop on it)
            raise ConfigError(f"another server is listening on {path}; stop it or choose another --socket")
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
        self.encoder = None  # the runner's tokenizer for request texts, long ones in a worker (tokenize_pool)
        self.model_name = ""
        self.loading = True
        self.stopping = False
        self.active = 0  # handlers running (drain waits for them to write their last bytes)


def _load_model(state: State, on_failure, beat_every: float | None) -> None:
    from nextn.build import build, log_progress

    # the model, its MTP block / draft model, and the scheduler (engine/build.py); systemctl status shows the
    # load's progress
    status = log_progress(also=lambda pct: sd.notify(f"STATUS=loading {Path(state.cfg.model.path).name}: {pct}%"))
    engine = build(state.cfg, progress=status)
    state.runner = engine.runner
    state.encoder = Encoder(engine.runner.tokenizer, engine.runner.file.meta)
    state.model_name = engine.model_name
    state.scheduler = engine.scheduler
    state.scheduler.on_failure = on_failure
    if beat_every:  # the idle worker beats faster than the watchdog looks
        state.scheduler.beat_every = min(state.scheduler.beat_every, beat_every)
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


def _alive(state: State, interval: float) -> bool:
    """Whether the watchdog may ping: while loading, or while the scheduler's worker beats. The event loop
    alone answering is not enough: a dead worker, or a step stuck for several intervals (a hung device),
    stops the pings and systemd restarts the service."""
    s = state.scheduler
    return s is None or (s.failure is None and s.seconds_since_heartbeat() < 4 * interval)


async def _watchdog(state: State, interval: float) -> None:
    while True:
        if _alive(state, interval):
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
    runner = AppRunner(app, access_log=None, handle_signals=False)  # errors before routing in the JSON shape too
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
    failed = asyncio.Event()  # the scheduler's worker died
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, state)
    tasks = [asyncio.create_task(_status(state))]
    interval = sd.watchdog_interval()
    if interval:
        tasks.append(asyncio.create_task(_watchdog(state, interval)))
    sd.notify(f"STATUS=loading {cfg.model.path}")
    log.info("listening on %s; loading %s", ", ".join(str(s.name) for s in sites), default_model.describe(cfg))
    try:
        load = loop.run_in_executor(None, _load_model, state, lambda e: loop.call_soon_threadsafe(failed.set),
                                    interval)
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
            await asyncio.wait([asyncio.create_task(stop.wait()), asyncio.create_task(failed.wait())],
                               return_when=asyncio.FIRST_COMPLETED)
            if failed.is_set():
                return await _exit_failed(state)
        state.stopping = True
        sd.notify("STOPPING=1", "STATUS=draining")
        log.info("stopping: draining for up to %.0f s", cfg.server.drain_timeout)
        if state.scheduler is not None:
            clean = await loop.run_in_executor(None, state.scheduler.drain, state.cfg.server.drain_timeout)
            if not clean:
                log.warning("drain timeout: unfinished requests were ended")
        await _handlers_done(state)
        return 0
    finally:
        for t in tasks:
            t.cancel()
        await runner.cleanup()
        if state.encoder is not None:
            state.encoder.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


async def _handlers_done(state: State, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while state.active and time.monotonic() < deadline:  # let handlers write their last chunks
        await asyncio.sleep(0.02)


async def _exit_failed(state: State) -> int:
    """The worker died (its requests have their error events): stop serving and exit for a restart."""
    state.stopping = True
    reason = state.scheduler.stopped_reason()
    log.critical("exiting: %s", reason)
    sd.notify("STOPPING=1", "STATUS=" + reason)
    await _handlers_done(state)
    return EXIT_SCHEDULER_STOPPED


def serve(cfg, reload_args=(None, None)) -> int:
    """`nextn serve`: returns the exit status."""
    sd.setup_logging(cfg.log.level)
    sockets = sd.listen_sockets()
    path = None
    if not sockets:
        path = socket_path(cfg)
        if not cfg.server.socket and not sd.under_systemd():  # the default socket: a directory only we write
            runtime = os.environ.get("XDG_RUNTIME_DIR")
            top = Path(runtime) if runtime else Path("/tmp")
            private_dir(path.parent, top)
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
