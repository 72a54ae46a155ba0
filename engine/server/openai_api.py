"""OpenAI request parsing and response shapes (chat.completion, text_completion, their stream chunks).

Parsing is strict about types and lenient about unknown fields (clients send many we do not use), except
OpenAI fields that change the answer and that nextn does not implement (tools, response_format, logit_bias
...): those are refused, so a client never takes an ignored setting for an applied one. Every problem raises
RequestError naming the field, which the app turns into a 400 in OpenAI's error shape.
Responses carry llama-server's `timings` next to OpenAI's `usage`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from nextn.errors import NextnError, RequestError
from nextn.sampling import SamplingParams


@dataclass
class Parsed:
    prompt: list[int]
    max_tokens: int
    params: SamplingParams
    stop: tuple[str, ...]
    stream: bool
    n_probs: int
    ignore_eos: bool
    include_usage: bool
    spec_body: dict  # llama-server's per-request "speculative.*" fields, checked by SpecConfig.for_request


def error_body(err: Exception, status: int) -> dict:
    kind = {404: "not_found_error", 503: "unavailable_error"}.get(
        status, "invalid_request_error" if 400 <= status < 500 else "server_error")
    message = str(err) if isinstance(err, NextnError) or status < 500 else "internal server error"
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def _get(body: dict, name: str, types, default=None, *, check=None, what: str = ""):
    if name not in body or body[name] is None:
        return default
    v = body[name]
    ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)))
    if not ok or (check is not None and not check(v)):
        raise RequestError(f"invalid value for '{name}': {v!r} (expected {what})")
    return v


def _int(body, name, default=None, lo=None):
    return _get(body, name, int, default, check=None if lo is None else (lambda v: v >= lo),
                what="an integer" + (f" >= {lo}" if lo is not None else ""))


def _num(body, name, default):
    return _get(body, name, (int, float), default, what="a number")  # SamplingParams checks its range


# OpenAI request fields that change what a client gets back and that nextn does not implement yet
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "response_format", "logit_bias", "json_schema",
               "grammar", "parallel_tool_calls", "audio", "modalities", "prediction", "best_of", "suffix", "echo")


def parse_common(body: dict, defaults, limits) -> dict:
    """Sampling, length and stream fields shared by both endpoints; `defaults`/`limits` are config sections."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False, [], {}, ""):
            raise RequestError(f"'{name}' is not supported by nextn (yet); remove it from the request")
    n = _int(body, "n", 1)
    if n != 1:
        raise RequestError("invalid value for 'n': only n = 1 is supported")
    max_tokens = _int(body, "max_completion_tokens", None, 1)
    max_tokens = _int(body, "max_tokens", max_tokens, 1)
    n_predict = _int(body, "n_predict", None, -1)  # llama-server's name; -1 = as many as allowed
    if max_tokens is None and n_predict is not None and n_predict > 0:
        max_tokens = n_predict
    max_tokens = min(max_tokens or limits.max_tokens, limits.max_tokens)
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    else:
        raise RequestError(f"invalid value for 'stop': {stop!r} (expected a string or a list of strings)")
    # every stop string is matched on every token: bounded, so that one request cannot slow the others down
    if len(stop) > limits.max_stop_strings:
        raise RequestError(f"invalid value for 'stop': {len(stop)} strings, at most {limits.max_stop_strings} "
                           f"(limits.max_stop_strings)")
    if any(len(s) > limits.max_stop_length for s in stop):
        raise RequestError(f"invalid value for 'stop': a string longer than {limits.max_stop_length} characters "
                           f"(limits.max_stop_length)")
    params = SamplingParams(
        temperature=_num(body, "temperature", defaults.temperature),
        top_k=_int(body, "top_k", defaults.top_k),
        top_p=_num(body, "top_p", defaults.top_p),
        min_p=_num(body, "min_p", defaults.min_p),
        repeat_penalty=_num(body, "repeat_penalty", defaults.repeat_penalty),
        presence_penalty=_num(body, "presence_penalty", 0.0),
        frequency_penalty=_num(body, "frequency_penalty", 0.0),
        seed=_int(body, "seed", defaults.seed),  # -1: random; below is refused, as the --seed flag
    )
    so = _get(body, "stream_options", dict, {}, what="an object")
    return {
        "max_tokens": max_tokens, "params": params, "stop": stop,
        "stream": _get(body, "stream", bool, False, what="true or false"),
        "ignore_eos": _get(body, "ignore_eos", bool, False, what="true or false"),
        "include_usage": bool(so.get("include_usage", False)),
        "spec_body": {k: v for k, v in body.items() if k.startswith("speculative.")},
    }


def _content_text(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RequestError(f"invalid value for 'messages[{i}].content': only text parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise RequestError(f"invalid value for 'messages[{i}].content': expected a string or a list of text parts")


def parse_chat(body: dict, tokenizer, defaults, limits) -> Parsed:
    common = parse_common(body, defaults, limits)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' is required: a non-empty list of {role, content} objects")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"invalid value for 'messages[{i}]': expected an object with a string 'role'")
        clean.append({**m, "content": _content_text(m.get("content"), i)})
    kwargs = _get(body, "chat_template_kwargs", dict, {}, what="an object")
    for name in ("messages", "add_generation_prompt"):  # the request's own, not overridable through the kwargs
        if name in kwargs:
            raise RequestError(f"invalid value for 'chat_template_kwargs': it may not set '{name}'")
    text = tokenizer.apply_chat_template(clean, add_generation_prompt=True, **kwargs)
    prompt = tokenizer.encode(text, add_special=False, parse_special=True)
    n_probs = 0
    if _get(body, "logprobs", bool, False, what="true or false"):
        n_probs = max(1, _int(body, "top_logprobs", 1, 0))
    return Parsed(prompt=prompt, n_probs=min(n_probs, 20), **common)


def parse_completion(body: dict, tokenizer, defaults, limits) -> Parsed:
    common = parse_common(body, defaults, limits)
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if isinstance(p, str):
        prompt = tokenizer.encode(p, add_special=True, parse_special=True)
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        prompt = list(p)
    else:
        raise RequestError("'prompt' is required: a string or a list of token ids")
    n_probs = _int(body, "logprobs", 0, 0) if not isinstance(body.get("logprobs"), bool) else int(body["logprobs"])
    n_probs = _int(body, "n_probs", n_probs, 0)
    return Parsed(prompt=prompt, n_probs=min(n_probs, 20), **common)


class Shaper:
    """Builds the response objects of one request."""

    def __init__(self, chat: bool, model: str, tokenizer):
        self.chat = chat
        self.model = model
        self.tok = tokenizer
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _logprobs(self, events) -> dict | None:
        evs = [e for e in events if e.logprob is not None]
        if not evs:
            return None
        if self.chat:
            return {"content": [{
                "token": self.tok.decode([e.token]), "logprob": e.logprob, "bytes": None,
                "top_logprobs": [{"token": self.tok.decode([t]), "logprob": lp, "bytes": None}
                                 for t, lp in e.top_logprobs]} for e in evs]}
        return {"tokens": [self.tok.decode([e.token]) for e in evs],
                "token_logprobs": [e.logprob for e in evs],
                "top_logprobs": [{self.tok.decode([t]): lp for t, lp in e.top_logprobs} for e in evs]}

    def chunk(self, text: str, events, finish=None, first=False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text or not finish else {})
            choice = {"index": 0, "delta": delta, "logprobs": self._logprobs(events), "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text, "logprobs": self._logprobs(events), "finish_reason": finish}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}

    def usage_chunk(self, usage: dict, timings: dict) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [], "usage": usage, "timings": timings}

    def full(self, text: str, events, finish: str, usage: dict, timings: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": self._logprobs(events), "finish_reason": finish}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": self._logprobs(events), "finish_reason": finish}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [choice], "usage": usage, "timings": timings}
