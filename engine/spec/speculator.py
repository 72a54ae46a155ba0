"""Per-slot speculation: which drafter proposes, how many tokens, and what verification keeps.

The scheduler asks each generating slot for a draft before a step (`SlotSpec.propose`), puts
[last token, d1..dk] in the batch with logits for every row, and after the step calls `SlotSpec.verify`
for (n_accepted, next token). A slot's drafters (spec/drafter.py) chain in the order of --spec-type: the
first that proposes at least max(1, n_min) tokens wins (e.g. `ngram-mod,draft-mtp`: a long n-gram match
wins, the MTP head fills the gaps). The device drafters (the MTP head, the draft model) draft for all slots
at once and leave each slot's drafts in its `held[type]`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, fields, replace

import numpy as np

from nextn.errors import ConfigError, RequestError
from nextn.sampling import Sampler
from nextn.spec import ngram
from nextn.spec.adaptive import AdaptiveDraft, StepCost
from nextn.spec.drafter import Drafter, HeldDrafts
from nextn.spec.verify import SynthAcceptance, synth_rates, verify_greedy, verify_sampled

MODEL_TYPES = ("draft-mtp", "draft-simple")
SPEC_TYPES = ("none", *MODEL_TYPES, *ngram.NGRAM_TYPES)


def parse_types(text: str | Sequence[str]) -> tuple[str, ...]:
    """'ngram-mod,draft-mtp' -> ('ngram-mod', 'draft-mtp'); 'none' alone -> (). Unknown names: ValueError."""
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    bad = [t for t in names if t not in SPEC_TYPES]
    if bad:
        raise ValueError(f"unknown speculative type(s) {', '.join(bad)} (known: {', '.join(SPEC_TYPES)})")
    if "none" in names and len(names) > 1:
        raise ValueError("speculative type 'none' cannot be combined with other types")
    return tuple(t for t in names if t != "none")


# request field speculative.NAME -> the SpecConfig field (ngram_*: NgramParams field) it overrides
_REQUEST_FIELDS = {"n_max": "n_max", "n_min": "n_min", "p_min": "p_min", "type": "types",
                   "ngram_size_n": "ngram_simple_size_n", "ngram_size_m": "ngram_simple_size_m",
                   "ngram_min_hits": "ngram_simple_min_hits"}
# ... and the [speculative] setting whose flag it mirrors, where the names differ
_SETTING = {"n_max": "draft_n_max", "n_min": "draft_n_min", "p_min": "draft_p_min", "types": "type"}


@dataclass(frozen=True)
class SpecConfig:
    """llama-server's speculative settings (same names and defaults), plus nextn's adaptive controller."""

    types: tuple[str, ...] = ()  # empty: no speculation
    n_max: int = 3  # --spec-draft-n-max
    n_min: int = 0  # --spec-draft-n-min
    p_min: float = 0.0  # --spec-draft-p-min: an MTP / draft-model draft stops below this probability
    adaptive: bool = True  # draft length and p_min follow the measured acceptance (n_max stays the bound)
    synth_rates: tuple[float, ...] = ()  # --spec-synth-rates: benchmarking only, output NOT valid
    synth_len: float = -1.0  # --spec-synth-len
    draft_model: str = ""  # --spec-draft-model: the GGUF of draft-simple
    ngram: ngram.NgramParams = field(default_factory=ngram.NgramParams)

    @property
    def enabled(self) -> bool:
        return bool(self.types)

    @property
    def uses_mtp(self) -> bool:
        return "draft-mtp" in self.types

    @property
    def uses_draft_model(self) -> bool:
        return "draft-simple" in self.types

    @property
    def synthetic(self) -> bool:
        return bool(self.synth_rates) or self.synth_len != -1.0

    def check(self) -> "SpecConfig":
        if self.n_max < 0 or not 0 <= self.n_min <= max(self.n_max, 0):
            raise ConfigError(f"speculative: need 0 <= draft_n_min <= draft_n_max, got {self.n_min} / {self.n_max}")
        if not 0.0 <= self.p_min <= 1.0:
            raise ConfigError(f"speculative: draft_p_min must be within [0, 1], got {self.p_min}")
        if self.synthetic:  # the rates are checked at start, not at the first request
            synth_rates(self.n_max, self.synth_rates or None, self.synth_len if self.synth_len != -1.0 else None)
        if "draft-simple" in self.types and not self.draft_model:
            raise ConfigError("speculative type draft-simple needs a draft model: --spec-draft-model FILE")
        return self

    def for_request(self, body: dict) -> "SpecConfig":
        """The request body's overrides, as llama-server accepts them: speculative.n_max / n_min / p_min /
        type / ngram_size_n / ngram_size_m / ngram_min_hits. Each keeps the type and bounds of the flag it
        overrides (engine/config.py; the n-gram sizes also NgramParams' ranges, as their flags): a draft
        length of 10**9 would take the scheduler down with every other request. A model-based type the
        server did not load (draft-mtp without the MTP block) cannot be asked for per request."""
        from nextn.config import check_request

        over = {}
        for name, key in _REQUEST_FIELDS.items():
            if f"speculative.{name}" in body:
                over[key] = check_request(f"speculative.{_SETTING.get(key, key)}", body[f"speculative.{name}"],
                                          f"speculative.{name}")
        cfg = self
        try:
            if "types" in over:
                types = parse_types(over["types"])
                if any(t in MODEL_TYPES for t in types) and not all(t in self.types for t in types if t in MODEL_TYPES):
                    raise ValueError("a model-based draft type must be enabled at server start (--spec-type)")
                over["types"] = types
            ng = {k: over.pop(k) for k in list(over) if k.startswith("ngram_")}
            if ng:  # llama-server maps these onto ngram-simple's parameters
                cfg = replace(cfg, ngram=replace(cfg.ngram, **ng))
            cfg = replace(cfg, **over).check()
        except (ValueError, ConfigError) as e:
            raise RequestError(f"invalid speculative parameter: {e}") from None
        return cfg


def from_config(section) -> SpecConfig:
    """SpecConfig from the [speculative] configuration section (engine/config.py)."""
    types = parse_types(section.type)
    ng = {f.name: getattr(section, f.name) for f in fields(ngram.NgramParams)}
    if section.default:  # llama-server's --spec-default
        types = types or ("ngram-mod",)
        ng.update(ngram_mod_n_match=24, ngram_mod_n_min=48, ngram_mod_n_max=64)
    rates = ()
    if section.synth_rates.strip():
        try:
            rates = tuple(float(x) for x in section.synth_rates.split(","))
        except ValueError:
            raise ConfigError(f"speculative.synth_rates = {section.synth_rates!r}: expected numbers P0,P1,...") from None
    try:
        ngram_params = ngram.NgramParams(**ng)
    except ValueError as e:
        raise ConfigError(f"speculative: {e}") from None
    return SpecConfig(types=types, n_max=section.draft_n_max, n_min=section.draft_n_min, p_min=section.draft_p_min,
                      adaptive=section.adaptive, synth_rates=rates, synth_len=section.synth_len,
                      draft_model=section.draft_model, ngram=ngram_params).check()


class SlotSpec:
    """Speculation state of one slot for one request."""

    def __init__(self, cfg: SpecConfig, cost: StepCost, seed: int = -1, shared: ngram.NgramShared | None = None):
        self.cfg = cfg
        if shared is not None and shared.params != cfg.ngram:
            shared = None  # a request with its own n-gram parameters gets its own tables
        # device drafters' drafts, by type; with the n-gram drafters, the chain in --spec-type order
        self.held = {t: HeldDrafts() for t in cfg.types if t in MODEL_TYPES}
        self.drafters: list[tuple[str, Drafter]] = [
            (t, self.held[t] if t in MODEL_TYPES else ngram.make_ngram_drafter(t, cfg.ngram, shared))
            for t in cfg.types]
        self.adaptive = AdaptiveDraft(cfg.n_max, cfg.n_min, cfg.p_min, cost) if cfg.adaptive else None
        self.synth = SynthAcceptance(cfg.n_max, cfg.synth_rates or None,
                                     cfg.synth_len if cfg.synth_len != -1.0 else None, seed) if cfg.synthetic else None
        self.k_next = 0  # draft length chosen for the next step
        self.source: Drafter | None = None  # the drafter of the current draft
        self.n_drafted = 0
        self.n_accepted = 0

    def start(self, prompt: Sequence[int]) -> None:
        for _, d in self.drafters:
            d.reset(prompt)

    def extend(self, tokens: Sequence[int]) -> None:
        """Tokens appended to the slot's sequence (emitted ones)."""
        for _, d in self.drafters:
            d.extend(tokens)

    def choose(self, n_other_tokens: int, room: int) -> int:
        """The draft length of the next step (`k_next`, what the device drafters draft), at most `room`: the
        drafts the request can still use before its context or max_tokens ends."""
        k = self.adaptive.choose(n_other_tokens) if self.adaptive else self.cfg.n_max
        self.k_next = max(0, min(k, room))
        return self.k_next

    @property
    def p_min(self) -> float:
        return self.adaptive.p_min if self.adaptive else self.cfg.p_min

    def propose(self, k: int) -> tuple[list[int], list[np.ndarray | None] | None]:
        """Up to k drafts and their draft distributions (None entries: point proposals)."""
        self.source = None
        if k <= 0:
            return [], None
        need = max(1, self.cfg.n_min)
        for t, drafter in self.drafters:
            d, q = drafter.propose(k)
            if len(d) >= need:
                self.source = drafter
                return list(d), q
        return [], None

    def verify(self, drafts, draft_probs, top, logits, sampler: Sampler, history: Sequence[int],
               eog: Collection[int]) -> tuple[int, int]:
        """(n_accepted, next token) for rows [last, d1..dk] of one step."""
        if self.synth is not None and drafts:
            if logits is None:  # greedy: the model's own token at the first rejected row is its argmax
                n = self.synth.n_accepted(drafts, eog)
                return n, int(top[n])
            return self.synth.verify(drafts, logits, sampler, history, eog)
        if logits is None:  # greedy without penalties: the device argmax decides
            return verify_greedy(drafts, top, eog)
        return verify_sampled(drafts, draft_probs, logits, sampler, history, eog)

    def observe(self, n_drafted: int, n_accepted: int) -> None:
        if n_drafted == 0:
            return
        self.n_drafted += n_drafted
        self.n_accepted += n_accepted
        if self.adaptive is not None:
            self.adaptive.update(n_drafted, n_accepted)
        if self.source is not None:
            self.source.feedback(n_drafted, n_accepted)

    def timings(self) -> dict:
        out = {"draft_n": self.n_drafted, "draft_n_accepted": self.n_accepted}
        if self.adaptive is not None:
            out["speculative"] = self.adaptive.state()
        if self.synth is not None:
            out["speculative_synthetic"] = True  # output is NOT valid model output
        return out
