"""`nextn chat` and `nextn complete`: clients of a running server over its Unix socket (httpx, SSE)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx

from nextn.errors import NextnError


SERVICE_SOCKET = Path("/run/nextn/nextn.sock")  # the packaged systemd service's (systemd/nextn.socket)


def _client(args) -> httpx.Client:
    if args.socket:
        tried = [Path(args.socket)]
    else:  # the socket `nextn serve` picks for this user, then the packaged service's
        from nextn.server.app import default_socket_path

        tried = list(dict.fromkeys([default_socket_path(), SERVICE_SOCKET]))
    path = next((p for p in tried if p.is_socket()), None)
    if path is None:
        raise NextnError(f"no server socket at {' or '.join(map(str, tried))}; start `nextn serve` (or the nextn "
                         f"service) or pass --socket")
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), base_url="http://nextn", timeout=args.timeout)


def _body(args, **extra) -> dict:
    body = {k: v for k, v in (("max_tokens", args.max_tokens), ("temperature", args.temp), ("seed", args.seed))
            if v is not None}
    body.update(extra)
    return body


def stream(client: httpx.Client, path: str, body: dict):
    """Yields (text piece, final chunk or None) from an SSE completion; raises NextnError on an error."""
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        if r.status_code != 200:
            r.read()
            raise NextnError(f"server: {r.json().get('error', {}).get('message', r.text)}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                raise NextnError(f"server: {obj['error']['message']}")
            if not obj.get("choices"):
                continue
            c = obj["choices"][0]
            text = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
            yield text or "", obj if c.get("finish_reason") else None


def _speed(final: dict) -> str:
    t = final.get("timings") or {}
    acc = f", drafts accepted {t['draft_n_accepted']}/{t['draft_n']}" if t.get("draft_n") else ""
    return (f"[{t.get('predicted_n', 0)} tokens, {t.get('predicted_per_second', 0):.1f} tok/s, "
            f"prompt {t.get('prompt_per_second', 0):.1f} tok/s{acc}]")


def complete_main(args) -> int:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    with _client(args) as c:
        if args.chat:
            path, body = "/v1/chat/completions", _body(args, messages=[{"role": "user", "content": prompt}])
        else:
            path, body = "/v1/completions", _body(args, prompt=prompt)
        if args.stop:
            body["stop"] = args.stop
        if args.json:
            r = c.post(path, json=body)
            print(json.dumps(r.json(), indent=2))
            return 0 if r.status_code == 200 else 1
        final = None
        for text, fin in stream(c, path, body):
            sys.stdout.write(text)
            sys.stdout.flush()
            final = fin or final
        sys.stdout.write("\n")
        if final:
            print(_speed(final), file=sys.stderr)
    return 0


def chat_main(args) -> int:
    messages = [{"role": "system", "content": args.system}] if args.system else []
    with _client(args) as c:
        while True:
            try:
                line = input("> ")
            except EOFError:
                print()
                return 0
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line})
            reply, final = [], None
            for text, fin in stream(c, "/v1/chat/completions", _body(args, messages=messages)):
                sys.stdout.write(text)
                sys.stdout.flush()
                reply.append(text)
                final = fin or final
            print()
            if final:
                print(_speed(final), file=sys.stderr)
            messages.append({"role": "assistant", "content": "".join(reply)})
