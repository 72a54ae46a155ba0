"""`--compare-llama-server PATH`: the same requests against llama.cpp's llama-server on the same GGUF, in the
same invocation.

One llama-server process per configuration (its speculative settings are start-up flags), on a free TCP
port of 127.0.0.1; requests are POST /completion with the same token ids as nextn's (so the tokenizer and
chat template are not part of the comparison), greedy unless told otherwise, and what is compared are the
server's own `timings` (llama-server and nextn define prompt_per_second and predicted_per_second alike:
decode speed counts the steps after the first token). The client and the parsing are tested against a
fake server (tests/test_bench.py); a real binary is optional.
"""

from __future__ import annotations

import http.client
import json
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from nextn.errors import NextnError

TIMING_KEYS = ("prompt_n", "prompt_ms", "prompt_per_second", "predicted_n", "predicted_ms", "predicted_per_second")


def find_binary(text: str) -> tuple[Path | None, str]:
    """(the executable, "") or (None, why it is skipped). A bare name is looked up on PATH."""
    p = Path(text).expanduser()
    if p.is_dir():
        p = p / "llama-server"
    if not p.exists() and os.sep not in text:
        found = shutil.which(text)
        if found:
            p = Path(found)
    if not p.exists():
        where = "no such file" if os.sep in text else "no such file, and not on PATH"
        return None, f"{text}: {where} (a llama.cpp build's llama-server binary is needed)"
    if not os.access(p, os.X_OK):
        return None, f"{p}: not executable"
    return p, ""


def parse_timings(body: dict) -> dict:
    """The `timings` of a /completion (or /v1/completions) response, normalized: every TIMING_KEYS entry,
    and draft_n / draft_n_accepted (llama-server leaves them out when nothing was drafted)."""
    t = body.get("timings")
    if not isinstance(t, dict):
        raise NextnError("llama-server: the response has no timings object")
    missing = [k for k in TIMING_KEYS if k not in t]
    if missing:
        raise NextnError(f"llama-server: timings lack {', '.join(missing)}")
    out = {k: (int(t[k]) if k.endswith("_n") else float(t[k])) for k in TIMING_KEYS}
    out["draft_n"] = int(t.get("draft_n", 0))
    out["draft_n_accepted"] = int(t.get("draft_n_accepted", 0))
    if out["draft_n_accepted"] > out["draft_n"]:
        raise NextnError(f"llama-server: {out['draft_n_accepted']} drafts accepted of {out['draft_n']} drafted")
    out["tokens"] = [int(x) for x in body.get("tokens") or []]
    return out


@dataclass
class LlamaClient:
    """POSTs /completion to a llama-server at host:port."""

    host: str
    port: int
    timeout: float = 3600.0

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            doc = json.loads(raw) if raw else {}
        except ValueError:
            doc = {"raw": raw[:200].decode(errors="replace")}
        return resp.status, doc

    def healthy(self) -> bool:
        try:
            status, _ = self.request("GET", "/health")
        except OSError:
            return False
        return status == 200

    def complete(self, ids: list[int], n_predict: int, *, temperature: float = 0.0, seed: int = 0,
                 ignore_eos: bool = False, cache_prompt: bool = False) -> dict:
        body = {"prompt": list(ids), "n_predict": n_predict, "temperature": temperature, "seed": seed,
                "ignore_eos": ignore_eos, "cache_prompt": cache_prompt, "stream": False, "return_tokens": True}
        t0 = time.perf_counter()
        status, doc = self.request("POST", "/completion", body)
        if status != 200:
            msg = doc.get("error", {}).get("message") if isinstance(doc.get("error"), dict) else doc
            raise NextnError(f"llama-server: /completion answered {status}: {msg}")
        out = parse_timings(doc)
        out["wall_s"] = time.perf_counter() - t0
        return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LlamaServer:
    """A llama-server process started for one configuration."""

    cmd: list[str]
    client: LlamaClient
    proc: subprocess.Popen
    log_path: Path

    @classmethod
    def start(cls, binary: Path, model: Path, spec_args: list[str], n_slots: int, n_ctx: int,
              extra: list[str], timeout: float = 600.0) -> LlamaServer:
        port = free_port()
        # -c is the context of all slots together in llama-server
        cmd = [str(binary), "-m", str(model), "-c", str(n_ctx * n_slots), "-np", str(n_slots),
               "--host", "127.0.0.1", "--port", str(port), *spec_args, *extra]
        log = Path(tempfile.mkstemp(prefix="nextn-bench-llama-server-", suffix=".log")[1])
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        srv = cls(cmd, LlamaClient("127.0.0.1", port), proc, log)
        deadline = time.monotonic() + timeout
        while not srv.client.healthy():
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-1500:]
                log.unlink(missing_ok=True)
                raise NextnError(f"llama-server exited with status {proc.returncode} at start "
                                 f"({shlex.join(cmd)}):\n{tail}")
            if time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-1500:]
                srv.close()
                raise NextnError(f"llama-server did not become healthy in {timeout:.0f} s "
                                 f"({shlex.join(cmd)}):\n{tail}")
            time.sleep(0.2)
        return srv

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_path.unlink(missing_ok=True)  # a failed start quoted its tail in the error already


@dataclass
class LlamaFleet:
    """One llama-server per configuration (label -> server), and the client calls the benches make."""

    binary: Path
    servers: dict = field(default_factory=dict)
    version: str = ""
    ignored: dict = field(default_factory=dict)  # label -> settings llama-server has no flag for

    @classmethod
    def start(cls, binary: Path, model: Path, configs, n_slots: int, n_ctx: int, extra: str = "") -> LlamaFleet:
        fleet = cls(binary)
        extra_args = shlex.split(extra or "")
        try:
            r = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30,
                               check=False)
            lines = (r.stdout + r.stderr).strip().splitlines()
            fleet.version = next((ln for ln in lines if ln.startswith("version")), lines[0] if lines else "")
        except (OSError, subprocess.SubprocessError):
            fleet.version = ""
        try:
            for c in configs:
                fleet.servers[c.label] = LlamaServer.start(binary, model, c.llama_server_args(), n_slots, n_ctx,
                                                           extra_args)
                if c.llama_server_ignores():
                    fleet.ignored[c.label] = c.llama_server_ignores()
        except BaseException:
            fleet.close()
            raise
        return fleet

    @classmethod
    def attach(cls, clients: dict) -> LlamaFleet:
        """A fleet of already running servers (label -> LlamaClient): the tests' fake server."""
        fleet = cls(Path("attached"))
        fleet.servers = {k: _Attached(c) for k, c in clients.items()}
        return fleet

    def complete(self, cfg, ids, n_predict: int, **kw) -> dict:
        return self.servers[cfg.label].client.complete(ids, n_predict, **kw)

    def complete_many(self, cfg, prompts: list[list[int]], n_predict: int, **kw) -> tuple[list[dict], float]:
        """The prompts sent at once (one thread each); returns their results and the wall time of all."""
        client = self.servers[cfg.label].client
        out: list = [None] * len(prompts)

        def one(i):
            try:
                out[i] = client.complete(prompts[i], n_predict, **kw)
            except Exception as e:  # noqa: BLE001 (re-raised below, on the caller's thread)
                out[i] = e

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        for r in out:
            if isinstance(r, Exception):
                raise r
        return out, wall

    def describe(self) -> dict:
        return {"binary": str(self.binary), "version": self.version,
                "commands": {k: shlex.join(getattr(s, "cmd", [])) for k, s in self.servers.items()},
                "ignored_settings": self.ignored}

    def close(self) -> None:
        for s in self.servers.values():
            s.close()


@dataclass
class _Attached:
    client: LlamaClient

    def close(self) -> None:
        pass


def start_or_skip(args, path: Path, configs, n_slots: int, n_ctx: int) -> tuple[LlamaFleet | None, dict]:
    """--compare-llama-server: (the started fleet, its description) or (None, {"skipped": why})."""
    text = getattr(args, "compare_llama_server", None)
    if not text:
        return None, {}
    binary, why = find_binary(text)
    if binary is None:
        print(f"llama-server comparison skipped: {why}")
        return None, {"binary": text, "skipped": why}
    fleet = LlamaFleet.start(binary, path, configs, n_slots, n_ctx, getattr(args, "llama_server_args", ""))
    return fleet, fleet.describe()
