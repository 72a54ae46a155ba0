"""Operator configuration: TOML files and CLI flags -> nested frozen dataclasses, strictly validated.

Load order (later wins): built-in defaults < $NEXTN_CONFIG_DIR/nextn.toml < $NEXTN_CONFIG_DIR/conf.d/*.toml
(sorted by name) < --config FILE < CLI flags. NEXTN_CONFIG_DIR defaults to /etc/nextn; tests point it at a
temporary directory. Every key remembers where its value came from (`Config.sources`), which
`nextn config show` prints.

Strict on purpose (unlike model metadata): an unknown key or section is an error with a did-you-mean, a
wrong type or out-of-range value names the file, the line, the dotted key, the value and what is allowed.
A ConfigError exits with 78 (EX_CONFIG), which the unit lists in RestartPreventExitStatus=.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nextn import default_model
from nextn.errors import ConfigError, RequestError

LOG_LEVELS = ("debug", "info", "warning", "error")
# llama-server holds sampling values as C floats and top-k as an int32: the ranges of its request fields
FLOAT32_MAX = float(np.finfo(np.float32).max)
INT32_MAX = 2**31 - 1
KV_CACHE_TYPES = ("f16", "q8_0", "q4_0")  # engine/ops/attention.py KV_TYPES; llama-server's names


def _f(default, doc: str, flag: str | None = None, *, lo=None, hi=None, choices=None, live=False):
    """A config field: its doc line, CLI flag, allowed range or choices, and whether SIGHUP can change it."""
    meta = {"doc": doc, "flag": flag, "lo": lo, "hi": hi, "choices": choices, "live": live}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ServerSection:
    socket: str = _f("", "Unix socket path; empty: $XDG_RUNTIME_DIR/nextn/nextn.sock, or /run/nextn/nextn.sock under systemd", "--socket")
    socket_group: str = _f("", "group owning the socket (empty: the server's own group)", "--socket-group")
    socket_mode: str = _f("0660", "permission bits of the socket, octal", "--socket-mode")
    tcp: str = _f("", "also listen on TCP HOST:PORT (empty: no TCP); flags --host/--port", None)
    parallel: int = _f(4, "slots: requests generated at the same time (each has its own KV sequence)", "--parallel", lo=1, hi=64)
    max_queue: int = _f(64, "requests waiting for a slot before new ones get 503", "--max-queue", lo=0)
    drain_timeout: float = _f(30.0, "seconds running requests may finish after SIGTERM", "--drain-timeout", lo=0.0)


@dataclass(frozen=True)
class ModelSection:
    path: str = _f("", "GGUF model file (empty: the embedded default model, nextn.default_model)", "--model")
    ctx_size: int = _f(0, "context size per slot in tokens (0: min(trained context, 4096))", "--ctx-size", lo=0)
    batch_size: int = _f(512, "tokens per step (prompt chunks and decode tokens of all slots)", "--batch-size", lo=1)
    cache_type_k: str = _f("f16", "KV cache type of K: f16, q8_0 or q4_0 (quantized halves or quarters the "
                           "cache of long contexts)", "--cache-type-k", choices=KV_CACHE_TYPES)
    cache_type_v: str = _f("f16", "KV cache type of V: f16, q8_0 or q4_0", "--cache-type-v", choices=KV_CACHE_TYPES)
    batch_invariant: bool = _f(True, "a request's logits are bit-identical alone, batched with others and in "
                               "speculative verify steps (one arithmetic for every batch size in the matmul "
                               "kernels; off: the one-token shortcuts, which round differently)",
                               "--batch-invariant")


@dataclass(frozen=True)
class DeviceSection:
    platform: str = _f("", "OpenCL platform: index or name substring (empty: any)", "--platform")
    device: str = _f("", "OpenCL device: index or name substring (empty: first GPU, else CPU)", "--device")


@dataclass(frozen=True)
class LimitsSection:
    max_body_bytes: int = _f(4 << 20, "largest request body in bytes (larger: 413)", "--max-body-bytes", lo=1024, live=True)
    max_tokens: int = _f(4096, "cap on a request's max_tokens (and the default when it gives none)", "--max-tokens", lo=1, live=True)
    max_stop_strings: int = _f(16, "most stop strings a request may give (each is matched on every token)",
                               "--max-stop-strings", lo=0, live=True)
    max_stop_length: int = _f(256, "longest stop string, in characters", "--max-stop-length", lo=1, live=True)
    body_timeout: float = _f(30.0, "seconds a request body may pause before the request gets a 408",
                             "--body-timeout", lo=0.1, hi=3600.0, live=True)


@dataclass(frozen=True)
class SamplingSection:
    temperature: float = _f(0.8, "default temperature (<= 0: greedy)", "--temp", lo=-FLOAT32_MAX, hi=FLOAT32_MAX,
                            live=True)
    top_k: int = _f(40, "default top-k (0: whole vocabulary)", "--top-k", lo=0, hi=INT32_MAX, live=True)
    top_p: float = _f(0.95, "default top-p (1.0: off)", "--top-p", lo=0.0, hi=1.0, live=True)
    min_p: float = _f(0.05, "default min-p (0.0: off)", "--min-p", lo=0.0, hi=1.0, live=True)
    repeat_penalty: float = _f(1.0, "default repeat penalty (1.0: off)", "--repeat-penalty", lo=0.0, hi=FLOAT32_MAX,
                               live=True)
    seed: int = _f(-1, "default seed (-1: random)", "--seed", lo=-1, hi=2**64 - 1, live=True)


def _speculative_section():
    """[speculative]: llama-server's --spec-* settings (same names, meanings and defaults), the n-gram ones
    from engine/spec/ngram/base.py's table, plus nextn's adaptive controller."""
    from nextn.spec import ngram

    fields_ = [
        ("type", str, _f("none", "comma list of draft types, chained in order: none, draft-mtp, ngram-simple, "
                         "ngram-map-k, ngram-map-k4v, ngram-mod, ngram-cache", "--spec-type")),
        ("draft_n_max", int, _f(3, "most tokens drafted per step", "--spec-draft-n-max", lo=0, hi=63)),
        ("draft_n_min", int, _f(0, "fewest drafted tokens worth verifying", "--spec-draft-n-min", lo=0, hi=63)),
        ("draft_p_min", float, _f(0.0, "an MTP draft less likely than this ends the draft", "--spec-draft-p-min",
                                  lo=0.0, hi=1.0)),
        ("adaptive", bool, _f(True, "draft length and p-min follow the measured acceptance per slot, falling back "
                              "to plain decoding while speculation costs more than it gains (draft_n_max stays "
                              "the bound)", "--spec-adaptive")),
        ("default", bool, _f(False, "llama-server's --spec-default: ngram-mod with n_match 24, n_min 48, n_max 64",
                             "--spec-default")),
        ("draft_model", str, _f("", "GGUF of the draft model for draft-simple (same vocabulary as the model)",
                                "--spec-draft-model")),
        ("draft_vocab", int, _f(0, "FR-Spec: the MTP head drafts over this many most frequent tokens (0: the whole "
                                "vocabulary); verification keeps the full head, so output is unchanged",
                                "--spec-draft-vocab", lo=0, hi=1 << 24)),
        ("draft_type_k", str, _f("f16", "KV cache type of K of the MTP block and of the draft model: f16, q8_0, "
                                 "q4_0", "--spec-draft-type-k", choices=KV_CACHE_TYPES)),
        ("draft_type_v", str, _f("f16", "KV cache type of V of the MTP block and of the draft model",
                                 "--spec-draft-type-v", choices=KV_CACHE_TYPES)),
        ("synth_rates", str, _f("", "BENCHMARKING ONLY, output not valid: per-position acceptance probabilities "
                                "P0,P1,...", "--spec-synth-rates")),
        ("synth_len", float, _f(-1.0, "BENCHMARKING ONLY, output not valid: mean synthetic acceptance length "
                                "including the target token (-1: off)", "--spec-synth-len")),
    ]
    for flag, name, typ, default, doc in ngram.FLAGS:
        fields_.append((name, typ, _f(default, doc, flag, lo=0 if typ is int else None)))
    return dataclasses.make_dataclass("SpeculativeSection", fields_, frozen=True)


SpeculativeSection = _speculative_section()


@dataclass(frozen=True)
class LogSection:
    level: str = _f("info", "log level", "--log-level", choices=LOG_LEVELS, live=True)


@dataclass(frozen=True)
class Config:
    server: ServerSection = field(default_factory=ServerSection)
    model: ModelSection = field(default_factory=ModelSection)
    device: DeviceSection = field(default_factory=DeviceSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    speculative: SpeculativeSection = field(default_factory=SpeculativeSection)
    log: LogSection = field(default_factory=LogSection)
    # dotted key -> where the value came from ("default", "FILE:LINE", "--flag"); not part of equality
    sources: dict = field(default_factory=dict, compare=False, repr=False)

    def get(self, dotted: str) -> Any:
        section, key = dotted.split(".")
        return getattr(getattr(self, section), key)

    def live_keys(self) -> list[str]:
        """Keys that SIGHUP may change without restarting (the rest need a restart)."""
        return [k for k, f in iter_fields() if f.metadata["live"]]


_SECTION_CLASSES = {
    "server": ServerSection, "model": ModelSection, "device": DeviceSection,
    "limits": LimitsSection, "sampling": SamplingSection, "speculative": SpeculativeSection, "log": LogSection,
}


def iter_fields():
    """(dotted key, dataclasses.Field) of every setting, in declaration order."""
    for section, cls in _SECTION_CLASSES.items():
        for f in dataclasses.fields(cls):
            yield f"{section}.{f.name}", f


def _field(dotted: str) -> dataclasses.Field:
    return dict(iter_fields())[dotted]


def config_dir() -> Path:
    return Path(os.environ.get("NEXTN_CONFIG_DIR", "/etc/nextn"))


def _did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _key_line(text: str, section: str, key: str) -> int | None:
    """Line of `key = ...` inside [section] (tomllib gives no positions; this covers the usual layout)."""
    current = None
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        m = re.match(r"^\[\s*([A-Za-z0-9_.-]+)\s*\]", s)
        if m:
            current = m.group(1)
            continue
        if current == section and re.match(rf"^{re.escape(key)}\s*=", s):
            return n
        if current is None and re.match(rf"^{re.escape(section)}\s*\.\s*{re.escape(key)}\s*=", s):
            return n
    return None


def _section_line(text: str, section: str) -> int | None:
    for n, line in enumerate(text.splitlines(), 1):
        if re.match(rf"^\s*\[\s*{re.escape(section)}\s*\]", line):
            return n
    return None


class _Invalid(Exception):
    """What a setting allows, for the caller to word (check_value for a file or flag, check_request for a
    request field)."""


def _check(dotted: str, value: Any) -> Any:
    f = _field(dotted)
    m = f.metadata
    want = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str, "bool": bool}[f.type]
    if want is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Invalid("a number")
        value = float(value)
        if not math.isfinite(value):  # TOML and JSON parsers take nan and inf
            raise _Invalid("a finite number")
    elif want is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid("an integer")
    elif want is str and not isinstance(value, str):
        raise _Invalid("a string")
    elif want is bool and not isinstance(value, bool):
        raise _Invalid("true or false")
    if m["choices"] and value not in m["choices"]:
        raise _Invalid("one of " + ", ".join(repr(c) for c in m["choices"]))
    lo, hi = m["lo"], m["hi"]
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _Invalid("a value " + (f">= {lo}" if hi is None else (f"<= {hi}" if lo is None else f"{lo} .. {hi}")))
    if dotted == "server.socket_mode" and not re.fullmatch(r"0?[0-7]{3}", value):
        raise _Invalid("octal permission bits such as '0660'")
    if dotted == "server.tcp" and value and not re.fullmatch(r".+:\d{1,5}", value):
        raise _Invalid("'' or HOST:PORT such as '127.0.0.1:8080'")
    if dotted == "speculative.type":
        from nextn.spec.speculator import parse_types

        try:
            parse_types(value)
        except ValueError as e:
            raise _Invalid(f"a comma list of known types ({e})") from None
    return value


def check_value(dotted: str, value: Any, where: str) -> Any:
    """Validates one value against its field; returns it converted (int -> float where a float is wanted)."""
    try:
        return _check(dotted, value)
    except _Invalid as e:
        raise ConfigError(f"{where}: {dotted} = {value!r} is invalid: allowed {e}") from None


def check_request(dotted: str, value: Any, name: str) -> Any:
    """A request field that overrides setting `dotted` for one request (`speculative.n_max` for
    speculative.draft_n_max): the same type and bounds as the setting, so a request cannot ask for what the
    flag refuses. A JSON number with an integral value counts as an integer. RequestError names the field."""
    f = _field(dotted)
    if f.type in (int, "int") and isinstance(value, float) and value.is_integer():
        value = int(value)
    try:
        return _check(dotted, value)
    except _Invalid as e:
        raise RequestError(f"invalid value for '{name}': {value!r} (allowed {e})") from None


def _read_file(path: Path) -> tuple[dict, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as e:  # its message carries "(at line L, column C)"
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


def _apply_file(values: dict, sources: dict, path: Path) -> None:
    data, text = _read_file(path)
    for section, body in data.items():
        if section not in _SECTION_CLASSES:
            line = _section_line(text, section)
            raise ConfigError(
                f"{path}{f':{line}' if line else ''}: unknown section [{section}]"
                f"{_did_you_mean(section, _SECTION_CLASSES)}; sections: {', '.join(_SECTION_CLASSES)}"
            )
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: {section} must be a [{section}] table, not {body!r}")
        keys = [f.name for f in dataclasses.fields(_SECTION_CLASSES[section])]
        for key, value in body.items():
            line = _key_line(text, section, key)
            where = f"{path}:{line}" if line else str(path)
            if key not in keys:
                raise ConfigError(
                    f"{where}: unknown key {section}.{key}{_did_you_mean(key, keys)}; "
                    f"keys of [{section}]: {', '.join(keys)}"
                )
            dotted = f"{section}.{key}"
            values[dotted] = check_value(dotted, value, where)
            sources[dotted] = where


def config_files(config_file: str | Path | None = None) -> list[Path]:
    """The files read, in load order (only those that exist, except an explicit --config which must)."""
    d = config_dir()
    files = [d / "nextn.toml"] if (d / "nextn.toml").is_file() else []
    conf_d = d / "conf.d"
    if conf_d.is_dir():
        files += sorted(p for p in conf_d.glob("*.toml") if p.is_file())
    if config_file is not None:
        p = Path(config_file)
        if not p.is_file():
            raise ConfigError(f"{p}: no such config file (--config)")
        # The unit passes the system file itself as --config: read it once, in its system place, so that
        # conf.d drop-ins still override it.
        if not any(p.resolve() == f.resolve() for f in files):
            files.append(p)
    return files


def load(config_file: str | Path | None = None, overrides: dict[str, tuple[Any, str]] | None = None,
         *, system: bool = True) -> Config:
    """Builds the effective configuration.

    overrides: dotted key -> (value, source name such as "--ctx-size"), from CLI flags.
    system: read $NEXTN_CONFIG_DIR (False for `nextn config check FILE`, which validates one file).
    """
    values: dict[str, Any] = {}
    sources = {k: "default" for k, _ in iter_fields()}
    files = config_files(config_file) if system else ([Path(config_file)] if config_file else [])
    for path in files:
        _apply_file(values, sources, path)
    for dotted, (value, src) in (overrides or {}).items():
        if dotted not in sources:
            raise ConfigError(f"{src}: unknown setting {dotted}{_did_you_mean(dotted, sources)}")
        values[dotted] = check_value(dotted, value, src)
        sources[dotted] = src
    if not values.get("model.path"):  # no model configured: the one nextn ships
        values["model.path"] = str(default_model.path())
        sources["model.path"] = default_model.SOURCE
    kwargs = {}
    for section, cls in _SECTION_CLASSES.items():
        sec = {k.split(".")[1]: v for k, v in values.items() if k.split(".")[0] == section}
        kwargs[section] = cls(**sec)
    return Config(**kwargs, sources=sources)


def show(cfg: Config) -> str:
    """The effective configuration as TOML, each value followed by where it came from."""
    out, last = [], None
    for dotted, _ in iter_fields():
        section, key = dotted.split(".")
        if section != last:
            out.append(("\n" if out else "") + f"[{section}]")
            last = section
        v = cfg.get(dotted)
        text = f'"{v}"' if isinstance(v, str) else repr(v)
        out.append(f"{key} = {text}".ljust(40) + f"  # {cfg.sources.get(dotted, 'default')}")
    return "\n".join(out)


def socket_mode(cfg: Config) -> int:
    return int(cfg.server.socket_mode, 8)
