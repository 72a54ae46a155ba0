"""`--config TYPES[:KEY=VALUE,...]`: the speculative configurations a bench compares in one invocation.

    none                                  plain decoding (always measured: the baseline of every speed-up)
    draft-mtp                             the MTP head with the serve defaults (--spec-draft-n-max 3, adaptive)
    draft-mtp:n_max=2                     ... drafting at most 2 tokens
    draft-mtp:n_max=1..4,adaptive=off     four configurations, n_max 1, 2, 3, 4, fixed draft length
    draft-mtp:n_max=2/4                   two configurations, n_max 2 and 4
    ngram-mod,draft-mtp:n_max=3           a chain, as --spec-type ngram-mod,draft-mtp
    draft-mtp:synth_rates=0.9/0.8/0.7     synthetic acceptance (BENCHMARKING ONLY: output not valid)

TYPES is a --spec-type list (commas); after the first ':' come KEY=VALUE pairs separated by commas. Keys are
the [speculative] settings without their `draft_` prefix (n_max, n_min, p_min, adaptive, synth_rates,
synth_len, draft_model; draft_vocab keeps its prefix) and the n-gram settings (ngram_mod_n_match, ngram_simple_size_n, ...). An integer
key takes a range A..B or a list A/B/C, which expands to one configuration per value; synth_rates' list is
one value (P0/P1/...).
"""

from __future__ import annotations

import difflib
import itertools
from dataclasses import dataclass, replace

from nextn.errors import ConfigError
from nextn.spec import ngram
from nextn.spec.speculator import SpecConfig, parse_types

# key -> (value type, lo, hi, llama-server flag or None when llama-server has no such setting)
_KEYS: dict[str, tuple[type, float | None, float | None, str | None]] = {
    "n_max": (int, 0, 63, "--spec-draft-n-max"),
    "n_min": (int, 0, 63, "--spec-draft-n-min"),
    "p_min": (float, 0.0, 1.0, "--spec-draft-p-min"),
    "adaptive": (bool, None, None, None),  # nextn's controller; llama-server drafts n_max always
    "synth_rates": (tuple, 0.0, 1.0, "--spec-synth-rates"),
    "synth_len": (float, None, None, "--spec-synth-len"),
    "draft_model": (str, None, None, "--spec-draft-model"),
    "draft_vocab": (int, 0, 1 << 24, None),  # nextn's FR-Spec draft vocabulary (a load setting)
}
for _flag, _name, _typ, _default, _doc in ngram.FLAGS:
    _KEYS[_name] = (_typ, 0 if _typ is int else None, None, _flag)
KEYS = tuple(_KEYS)
LOAD_SETTINGS = {"draft_vocab": "speculative.draft_vocab"}  # keys that need a runner of their own
_SPEC_FIELD = {"n_max": "n_max", "n_min": "n_min", "p_min": "p_min", "adaptive": "adaptive",
               "synth_rates": "synth_rates", "synth_len": "synth_len", "draft_model": "draft_model"}


@dataclass(frozen=True)
class BenchConfig:
    """One configuration: its --spec-type chain and the settings it overrides (the rest are serve's)."""

    types: tuple[str, ...]  # () = none
    params: tuple[tuple[str, object], ...] = ()  # (key, value), in the order given

    @property
    def label(self) -> str:
        head = ",".join(self.types) or "none"
        if not self.params:
            return head
        return head + ":" + ",".join(f"{k}={_show(v)}" for k, v in self.params)

    @property
    def is_none(self) -> bool:
        return not self.types

    def get(self, key: str, default=None):
        return dict(self.params).get(key, default)

    def spec(self, base: SpecConfig) -> SpecConfig:
        """The SpecConfig this configuration runs with: `base` (serve's settings) with the types and overrides."""
        over = {"types": self.types}
        ng = {}
        for k, v in self.params:
            if k in LOAD_SETTINGS:
                continue
            if k in _SPEC_FIELD:
                over[_SPEC_FIELD[k]] = v
            else:
                ng[k] = v
        cfg = replace(base, **over)
        if ng:
            cfg = replace(cfg, ngram=replace(cfg.ngram, **ng))
        return cfg.check()

    def load_settings(self) -> tuple[tuple[str, object], ...]:
        """The settings this configuration needs at load time ((dotted name, value), LOAD_SETTINGS)."""
        return tuple((LOAD_SETTINGS[k], v) for k, v in self.params if k in LOAD_SETTINGS)

    def llama_server_args(self) -> list[str]:
        """The same configuration as llama-server flags (settings it lacks, such as adaptive, are left out)."""
        if not self.types:
            return []
        out = ["--spec-type", ",".join(self.types)]
        for k, v in self.params:
            flag = _KEYS[k][3]
            if flag is not None:
                out += [flag, ",".join(str(x) for x in v) if isinstance(v, tuple) else str(v)]
        return out

    def llama_server_ignores(self) -> list[str]:
        return [k for k, _ in self.params if _KEYS[k][3] is None]


def _show(v) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, tuple):
        return "/".join(_show(x) for x in v)
    return str(v)


def _bounded(key: str, v, lo, hi):
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{key}={v}: out of range {rng}")
    return v


def _scalar(key: str, typ, text: str, lo, hi):
    if typ is int:
        try:
            return _bounded(key, int(text), lo, hi)
        except ValueError as e:
            if "out of range" in str(e):
                raise
            raise ValueError(f"{key}={text!r}: expected an integer") from None
    if typ is float:
        try:
            return _bounded(key, float(text), lo, hi)
        except ValueError as e:
            if "out of range" in str(e):
                raise
            raise ValueError(f"{key}={text!r}: expected a number") from None
    if typ is bool:
        t = text.lower()
        if t in ("1", "on", "true", "yes"):
            return True
        if t in ("0", "off", "false", "no"):
            return False
        raise ValueError(f"{key}={text!r}: expected on or off")
    return text


def _values(key: str, text: str) -> list:
    """The value(s) of key=text: several for an integer range or list, else one."""
    typ, lo, hi, _ = _KEYS[key]
    if not text:
        raise ValueError(f"{key}=: empty value")
    if typ is tuple:
        return [tuple(_scalar(key, float, x, lo, hi) for x in text.split("/"))]
    if typ is int and ".." in text:
        a, _, b = text.partition("..")
        a, b = _scalar(key, int, a, lo, hi), _scalar(key, int, b, lo, hi)
        if a > b:
            raise ValueError(f"{key}={text}: empty range (write the smaller bound first)")
        return list(range(a, b + 1))
    if typ is int and "/" in text:
        return [_scalar(key, int, x, lo, hi) for x in text.split("/")]
    return [_scalar(key, typ, text, lo, hi)]


def parse_config(text: str) -> list[BenchConfig]:
    """One --config argument -> its configuration(s) (a range or list of integers expands). ValueError with
    a message naming what is wrong."""
    text = text.strip()
    if not text:
        raise ValueError("empty configuration (write e.g. none, draft-mtp or draft-mtp:n_max=3)")
    head, sep, tail = text.partition(":")
    if "=" in head:
        raise ValueError(f"{text!r}: the speculative types come first, then ':' and KEY=VALUE pairs "
                         "(e.g. draft-mtp:n_max=3)")
    types = parse_types(head)  # ValueError naming unknown types
    if sep and not tail.strip():
        raise ValueError(f"{text!r}: nothing after ':' (write KEY=VALUE pairs, e.g. n_max=3)")
    pairs: list[tuple[str, list]] = []
    for item in (tail.split(",") if sep else []):
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq:
            raise ValueError(f"{item.strip()!r} in {text!r}: expected KEY=VALUE")
        if key not in _KEYS:
            near = difflib.get_close_matches(key, KEYS, 1)
            hint = f" (did you mean {near[0]}?)" if near else f" (known: {', '.join(KEYS[:7])}, ngram_*)"
            raise ValueError(f"unknown key {key!r} in {text!r}{hint}")
        if any(k == key for k, _ in pairs):
            raise ValueError(f"{key} given twice in {text!r}")
        pairs.append((key, _values(key, value)))
    if not types and pairs:
        raise ValueError(f"{text!r}: 'none' takes no settings")
    keys = [k for k, _ in pairs]
    combos = itertools.product(*(v for _, v in pairs))
    return [BenchConfig(types, tuple(zip(keys, combo, strict=True))) for combo in combos]


def parse_configs(texts, default: tuple[str, ...] = ("none",)) -> list[BenchConfig]:
    """Every --config (or `default`), expanded, with `none` first (added when missing: the baseline).
    Checks each against SpecConfig (e.g. n_min <= n_max, draft-simple needs draft_model). The items of
    `texts` may be strings or the lists argparse made of them with `type=parse_config`."""
    out: list[BenchConfig] = []
    for t in (texts or default):
        for c in (parse_config(t) if isinstance(t, str) else t):
            if c in out:
                raise ConfigError(f"--config: {c.label} given twice")
            try:
                c.spec(SpecConfig())  # refused now, not after loading
            except ConfigError as e:
                raise ConfigError(f"--config {c.label}: {e}") from None
            out.append(c)
    none = BenchConfig(())
    return [none] + [c for c in out if c != none]


def n_max_of(cfg: BenchConfig, base: SpecConfig) -> int:
    return 0 if cfg.is_none else int(cfg.get("n_max", base.n_max))


def without(cfg: BenchConfig, key: str) -> str:
    """The label of cfg without `key` (groups configurations that differ only in n_max, for the plot)."""
    return BenchConfig(cfg.types, tuple((k, v) for k, v in cfg.params if k != key)).label

