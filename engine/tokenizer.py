"""Tokenizer built from GGUF metadata, giving the same token ids as llama.cpp for the same vocabulary.

Two tokenizer models are supported, named by `tokenizer.ggml.model`:

- "gpt2": byte-level BPE. The text is split by the pre-tokenizer regexes llama.cpp uses for the
  file's `tokenizer.ggml.pre` (src/llama-vocab.cpp, llm_tokenizer_bpe), each piece is mapped to
  GPT-2's byte-to-unicode alphabet and merged by rank. The `tokenizers` library does the split and
  the merges (same rank-then-leftmost merge order as llama.cpp's llm_tokenizer_bpe_session).
- "llama": SentencePiece-style merges driven by token scores, with "▁" for spaces and <0xNN> byte
  fallback, as llama.cpp's llm_tokenizer_spm_session does; written out here because it is not plain
  BPE (the merge priority is the merged token's score, ties going to the leftmost pair).

Special tokens are split out first exactly as llama.cpp's tokenizer_st_partition does: CONTROL and
UNKNOWN tokens only when `parse_special` is set, USER_DEFINED tokens always, longest text first.

`decode` renders what llama.cpp's detokenize renders without its optional space clean-up (the
clean-up is not what llama-server streams, and it would break the encode -> decode round trip).
"""

from __future__ import annotations

import codecs
import heapq
import re
from collections.abc import Iterable
from typing import Any

from nextn.errors import ModelLoadError

# GGUF token types (gguf.TokenType) and llama.cpp's attribute bits (llama_token_attr). Attributes are
# kept as bits because llama.cpp ORs CONTROL into tokens it recognizes by text (see _fix_attrs).
TYPE_NORMAL, TYPE_UNKNOWN, TYPE_CONTROL, TYPE_USER_DEFINED, TYPE_UNUSED, TYPE_BYTE = 1, 2, 3, 4, 5, 6
ATTR_UNKNOWN, ATTR_UNUSED, ATTR_NORMAL, ATTR_CONTROL, ATTR_USER_DEFINED, ATTR_BYTE = 1, 2, 4, 8, 16, 32
_TYPE_TO_ATTR = {
    TYPE_NORMAL: ATTR_NORMAL,
    TYPE_UNKNOWN: ATTR_UNKNOWN,
    TYPE_CONTROL: ATTR_CONTROL,
    TYPE_USER_DEFINED: ATTR_USER_DEFINED,
    TYPE_UNUSED: ATTR_UNUSED,
    TYPE_BYTE: ATTR_BYTE,
}

# Pre-tokenizer regexes, applied in sequence, each splitting every piece into matches and the text
# between them (llama.cpp's unicode_regex_split; the `tokenizers` "isolated" Split behaves the same).
# These are llama.cpp's adapted forms: (?i:'s|...) is spelled out as (?:'[sS]|...) so that
# case-folding corner cases (U+017F matching 's') behave as llama.cpp's hand-written splitters do.
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_PRE_REGEXES: dict[str, tuple[str, ...]] = {
    "llama3": (
        _CONTRACTIONS
        + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "qwen2": (
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "qwen35": (
        _CONTRACTIONS
        + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "gpt2": (_GPT2_RE,),
    "deepseek3": (
        r"\p{N}{1,3}",
        r"[一-龥぀-ゟ゠-ヿ]+",
        (
            r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
            r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        ),
    ),
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_RE, r"\p{N}+", r"[0-9][0-9][0-9]"),
}

# `tokenizer.ggml.pre` -> (regex set, ignore_merges, default add_bos), as llama.cpp's vocab loader maps
# them. ignore_merges: a whole pre-token that is itself in the vocabulary is emitted as one token.
_PRE_TYPES: dict[str, tuple[str, bool, bool]] = {
    "default": ("default", False, False),
    **{name: ("llama3", True, True) for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral")},
    **{name: ("qwen2", False, False) for name in ("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez")},
    "qwen35": ("qwen35", False, False),
    **{name: ("gpt2", False, False) for name in ("gpt-2", "phi-2", "mpt", "olmo")},
    **{name: ("llama3", True, False) for name in ("glm4", "glm5")},  # llama.cpp's CHATGLM4: the llama3 regex
    "deepseek-v3": ("deepseek3", False, False),
}

# Token texts llama.cpp treats as end of generation (llama_vocab::impl::load, special_eog_ids); it
# also marks them CONTROL when a converter left them NORMAL.
_EOG_TEXTS = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
))  # fmt: skip
_EOT_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>",
)  # fmt: skip
_FIM_TEXTS = {  # fill-in-the-middle tokens, found by text when the file names no id; all become CONTROL
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}  # fmt: skip
_FIM_EOG = ("fim_pad", "fim_rep", "fim_sep")  # these also end generation in llama.cpp
_SPACE = "\u2581"  # "▁", SentencePiece's escaped space
_SURROGATE = re.compile("[\ud800-\udfff]")
# Letters, marks and digits that Unicode 16.0 added, which llama.cpp's unicode-data.cpp (Unicode 15)
# classes as unassigned: found by tokenizing every code point with both (Tokenizer._encode_unicode16).
_UNICODE16 = re.compile(
    "[\u0897\u1c89-\u1c8a\ua7cb-\ua7cd\ua7da-\ua7dc\U000105c0-\U000105f3\U00010d40-\U00010d65"
    "\U00010d69-\U00010d6d\U00010d6f-\U00010d85\U00010ec2-\U00010ec4\U00010efc\U00011380-\U00011389"
    "\U0001138b\U0001138e\U00011390-\U000113b5\U000113b7-\U000113c0\U000113c2\U000113c5"
    "\U000113c7-\U000113ca\U000113cc-\U000113d3\U000113e1-\U000113e2\U000116d0-\U000116e3"
    "\U00011bc0-\U00011be0\U00011bf0-\U00011bf9\U00011f5a\U00013460-\U000143fa\U00016100-\U00016139"
    "\U00016d40-\U00016d6c\U00016d70-\U00016d79\U00018cff\U0001ccf0-\U0001ccf9\U0001e5d0-\U0001e5fa]"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of byte-level BPE vocabularies)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


BYTE_TO_UNICODE = _bytes_to_unicode()
_UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}


class StreamDecoder:
    """Turns generated token ids into text as it becomes complete UTF-8.

    A character split over several byte tokens (an emoji is often 2-4 of them) is held back until
    its last byte arrives; bytes that can never form a character come out as U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self._tok = tokenizer
        self._special = not skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._tok.token_to_piece(token_id, special=self._special))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class Tokenizer:
    """A GGUF vocabulary: encode/decode as llama.cpp does, end-of-generation ids, chat template."""

    def __init__(self, meta: dict[str, Any], chat_template: str | None = None):
        model = meta.get("tokenizer.ggml.model")
        if model not in ("gpt2", "llama"):
            raise ModelLoadError(
                f"tokenizer model {model!r} (tokenizer.ggml.model) is not supported; "
                "nextn supports 'gpt2' (byte-level BPE) and 'llama' (SentencePiece)"
            )
        self.model: str = model
        tokens = meta.get("tokenizer.ggml.tokens")
        if not tokens:
            raise ModelLoadError("the file has no vocabulary (tokenizer.ggml.tokens is missing or empty)")
        # llama.cpp renames empty token strings so that every text maps to one id
        self.tokens: list[str] = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        self.n_vocab = len(self.tokens)
        types = meta.get("tokenizer.ggml.token_type")
        if types is not None and len(types) < self.n_vocab:
            raise ModelLoadError(
                f"tokenizer.ggml.token_type has {len(types)} entries for {self.n_vocab} tokens"
            )
        self._attr = (
            [_TYPE_TO_ATTR.get(t, 0) for t in types] if types is not None else [ATTR_NORMAL] * self.n_vocab
        )
        self._token_to_id = {t: i for i, t in enumerate(self.tokens)}  # a duplicate text keeps its last id

        self._load_special_ids(meta)
        self._fix_attrs()
        if self.add_bos and self.bos_id is None:
            raise ModelLoadError("the vocabulary asks for a BOS token (add_bos_token) but has none")
        if self.add_eos and self.eos_id is None:
            raise ModelLoadError("the vocabulary asks for an EOS token (add_eos_token) but has none")

        # llama.cpp's cache_special_tokens: longest text (in bytes) first, so "<|im_start|>" wins
        # over a token "<|im".
        special = sorted(
            (i for i, a in enumerate(self._attr) if a & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN)),
            key=lambda i: -len(self.tokens[i].encode()),
        )
        every = [(i, self.tokens[i]) for i in special]
        user = [(i, t) for i, t in every if not self._attr[i] & (ATTR_CONTROL | ATTR_UNKNOWN)]
        # indexed by parse_special: the tokens to split out, and the characters they start with
        self._specials = {
            True: (every, frozenset(t[0] for _, t in every)),
            False: (user, frozenset(t[0] for _, t in user)),
        }
        self._pieces: list[bytes | None] = [None] * self.n_vocab

        if model == "gpt2":
            self._init_bpe(meta)
        else:
            self._init_spm(meta)

        from nextn.chat_template import ChatTemplate

        source = chat_template if chat_template is not None else meta.get("tokenizer.chat_template")
        self.chat_template = ChatTemplate(
            source,
            bos_token=self.tokens[self.bos_id] if self.bos_id is not None else "",
            eos_token=self.tokens[self.eos_id] if self.eos_id is not None else "",
        )

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], chat_template: str | None = None) -> Tokenizer:
        """Builds the tokenizer of a GGUF file; `chat_template` overrides the file's template."""
        return cls(meta, chat_template)

    # ---- loading

    def _load_special_ids(self, meta: dict[str, Any]) -> None:
        n = self.n_vocab
        # llama.cpp's defaults per model, overridden by the file; ids outside the vocabulary are dropped
        if self.model == "llama":
            ids: dict[str, int | None] = {"bos": 1, "eos": 2, "unk": 0}
            add_bos, self._add_space_prefix = True, True
        else:
            ids = {"bos": 11, "eos": 11, "unk": None}
            add_bos, self._add_space_prefix = False, False
        for name in ("bos", "eos", "unk"):
            if ids[name] is not None and ids[name] >= n:
                ids[name] = None
        keys = {"bos": "bos", "eos": "eos", "unk": "unknown", "eot": "eot", "eom": "eom", "pad": "padding"}
        keys.update({f: f for f in _FIM_TEXTS})
        for name, key in keys.items():
            v = meta.get(f"tokenizer.ggml.{key}_token_id")
            if v is not None and 0 <= int(v) < n:
                ids[name] = int(v)
            else:
                ids.setdefault(name, None)
        self.bos_id: int | None = ids["bos"]
        self.eos_id: int | None = ids["eos"]
        self.unk_id: int | None = ids["unk"]
        self.eot_id: int | None = ids["eot"]
        self.eom_id: int | None = ids["eom"]
        self.pad_id: int | None = ids["pad"]
        self._fim = {f: ids[f] for f in _FIM_TEXTS}

        if self.model == "gpt2":
            pre = meta.get("tokenizer.ggml.pre") or "default"
            if pre not in _PRE_TYPES:
                raise ModelLoadError(
                    f"pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; "
                    f"supported: {', '.join(sorted(_PRE_TYPES))}"
                )
            self.pre = pre
            self._regex_set, self._ignore_merges, add_bos = _PRE_TYPES[pre]
        else:
            self.pre = "default"
        # read for both models as llama.cpp does; for BPE it only makes decode drop a leading space
        self._add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", self._add_space_prefix))
        v = meta.get("tokenizer.ggml.add_bos_token")
        self.add_bos: bool = bool(v) if v is not None else add_bos
        self.add_eos: bool = bool(meta.get("tokenizer.ggml.add_eos_token", False))

    def _fix_attrs(self) -> None:
        """End-of-generation ids and the CONTROL marks llama.cpp adds by token text."""
        attr, t2i = self._attr, self._token_to_id

        def control(i: int) -> None:
            attr[i] |= ATTR_CONTROL

        if self.eot_id is None:
            self.eot_id = next((t2i[t] for t in _EOT_TEXTS if t in t2i), None)
            if self.eot_id is not None:
                control(self.eot_id)
        if self.eom_id is None and "<|eom_id|>" in t2i:
            self.eom_id = t2i["<|eom_id|>"]
            control(self.eom_id)
        for f, texts in _FIM_TEXTS.items():
            if self._fim[f] is None:
                self._fim[f] = next((t2i[t] for t in texts if t in t2i), None)
                if self._fim[f] is not None:
                    control(self._fim[f])
        # llama.cpp: a CONTROL token whose text says "unused" is unused
        for i, a in enumerate(attr):
            if a & ATTR_CONTROL and "unused" in self.tokens[i]:
                attr[i] |= ATTR_UNUSED

        eog = {self._fim[f] for f in _FIM_EOG if self._fim[f] is not None}
        for text, i in t2i.items():
            if text in _EOG_TEXTS:
                eog.add(i)
                control(i)
        eog.update(i for i in (self.eos_id, self.eot_id, self.eom_id) if i is not None)
        texts = {self.tokens[i]: i for i in eog}
        # gpt-oss / solar-open: "<|end|>" ends a message, not the generation, when these exist
        if "<|end|>" in texts and (
            ("<|return|>" in texts and ("<|call|>" in texts or "<|calls|>" in texts))
            or ({"<|calls|>", "<|call|>"} & texts.keys() and "<|flush|>" in texts)
        ):
            eog.discard(texts["<|end|>"])
            attr[texts["<|end|>"]] = ATTR_USER_DEFINED
        # gemma4 / plamo: "</s>" is an ordinary token there
        if "</s>" in texts and ("<|tool_response>" in texts or "<|plamo:eos|>" in texts):
            eog.discard(texts["</s>"])
            attr[texts["</s>"]] = ATTR_NORMAL
        # gpt-oss: always rendered, like llama.cpp's USER_DEFINED override
        for text in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):
            if text in t2i:
                attr[t2i[text]] = ATTR_USER_DEFINED
        self.eot_ids: frozenset[int] = frozenset(eog)

    def _init_bpe(self, meta: dict[str, Any]) -> None:
        from tokenizers import Regex, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        t2i = self._token_to_id
        merges = []
        for m in meta.get("tokenizer.ggml.merges") or ():
            # llama.cpp splits at the first space after the first character (a merge may start with " ")
            cut = m.find(" ", 1)
            if cut < 0:
                continue
            a, b = m[:cut], m[cut + 1 :]
            # `tokenizers` refuses merges that leave the vocabulary. Only a malformed file has them;
            # llama.cpp would merge into a symbol with no id and spell it out byte by byte, dropping
            # non-ASCII bytes, where keeping the two halves loses nothing.
            if a in t2i and b in t2i and a + b in t2i:
                merges.append((a, b))
        try:
            bpe = models.BPE(vocab=dict(t2i), merges=merges, ignore_merges=self._ignore_merges)
        except Exception as e:  # the Rust side reports malformed vocabularies as plain exceptions
            raise ModelLoadError(f"cannot build the BPE tokenizer from the vocabulary: {e}") from None
        hf = HFTokenizer(bpe)
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _PRE_REGEXES[self._regex_set]]
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.pre_tokenizer = pre_tokenizers.Sequence([*splits, byte_level])
        self._hf = hf
        # For text with characters new in Unicode 16 (see _UNICODE16): the split alone, and a
        # tokenizer over the same model that takes the pieces as they are.
        self._hf_split = pre_tokenizers.Sequence(splits)
        self._hf_pieces = HFTokenizer(bpe)
        self._hf_pieces.pre_tokenizer = byte_level

    def _init_spm(self, meta: dict[str, Any]) -> None:
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None:
            scores = [0.0] * self.n_vocab
        elif len(scores) < self.n_vocab:
            raise ModelLoadError(f"tokenizer.ggml.scores has {len(scores)} entries for {self.n_vocab} tokens")
        self._scores = [float(s) for s in scores[: self.n_vocab]]
        t2i = self._token_to_id
        byte_ids = []
        for b in range(256):
            i = t2i.get(f"<0x{b:02X}>")
            if i is None:  # llama.cpp falls back to the byte as a one-character token (and fails
                # where there is none; <unk> stands in here)
                i = t2i.get(chr(b)) if b < 0x80 else None
            byte_ids.append(i if i is not None else self.unk_id)
        self._byte_ids = byte_ids

    # ---- encoding

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of `text`. add_special: BOS/EOS as the vocabulary asks (llama.cpp's add_special);
        parse_special: control tokens written in the text (e.g. "<|im_start|>") become their ids."""
        if not text.isascii() and _SURROGATE.search(text):
            # a lone surrogate (e.g. from a JSON "\ud83d" escape) has no UTF-8 form; llama.cpp never
            # sees one because its input is bytes, so give it what a UTF-8 decoder would: U+FFFD
            text = _SURROGATE.sub("\ufffd", text)
        out: list[int] = []
        if add_special and self.add_bos:
            out.append(self.bos_id)
        fragments = self._partition(text, parse_special) if text else []
        if self.model == "gpt2":
            encode = self._hf.encode
            for f in fragments:
                if type(f) is int:
                    out.append(f)
                elif f.isascii() or not _UNICODE16.search(f):
                    out.extend(encode(f, add_special_tokens=False).ids)
                else:
                    out.extend(self._encode_unicode16(f))
        else:
            prev_special = True  # SentencePiece puts a space before the text and after each special token
            for f in fragments:
                if type(f) is int:
                    out.append(f)
                    prev_special = True
                else:
                    if self._add_space_prefix and prev_special:
                        f = " " + f
                    self._spm_encode(f.replace(" ", _SPACE), out)
                    prev_special = False
        if add_special and self.add_eos:
            out.append(self.eos_id)
        return out

    def _encode_unicode16(self, text: str) -> list[int]:
        """Byte-level BPE of text holding characters that Unicode 16 added. llama.cpp's character
        tables (Unicode 15) do not know them, so its splitter treats them as unassigned, while the
        regex engine of `tokenizers` knows them as letters, marks or digits. The split is made on a
        copy where each of them is an always-unassigned code point (U+0378, same length in
        characters), then the original text is cut at those places."""
        spans = self._hf_split.pre_tokenize_str(_UNICODE16.sub("\u0378", text))
        pieces = [text[a:b] for _, (a, b) in spans]
        return self._hf_pieces.encode(pieces, is_pretokenized=True, add_special_tokens=False).ids

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Splits out special tokens the way llama.cpp's tokenizer_st_partition does: one token text
        at a time, longest first, every non-overlapping occurrence in each remaining text fragment."""
        specials, firsts = self._specials[parse_special]
        # most texts hold none of the few characters special tokens start with ("<", "[")
        present = {c for c in firsts if c in text}
        if not present:
            return [text]
        fragments: list[str | int] = [text]
        for tid, ttext in specials:
            if ttext[0] not in present or not any(type(f) is str and ttext in f for f in fragments):
                continue
            out: list[str | int] = []
            for f in fragments:
                if type(f) is str and ttext in f:
                    for j, part in enumerate(f.split(ttext)):
                        if j:
                            out.append(tid)
                        if part:
                            out.append(part)
                else:
                    out.append(f)
            fragments = out
        return fragments

    def _spm_encode(self, text: str, out: list[int]) -> None:
        """llama.cpp's llm_tokenizer_spm_session: start from single characters, repeatedly merge the
        adjacent pair whose concatenation is the highest-scoring token (leftmost on ties)."""
        t2i, scores = self._token_to_id, self._scores
        sym = list(text)
        n = len(sym)
        if n == 0:
            return
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap = []
        for i in range(n - 1):
            pair = sym[i] + sym[i + 1]
            tid = t2i.get(pair)
            if tid is not None:
                heap.append((-scores[tid], i, i + 1, len(pair)))
        heapq.heapify(heap)
        push, pop = heapq.heappush, heapq.heappop
        while heap:
            _, left, right, size = pop(heap)
            a, b = sym[left], sym[right]
            # a pair is stale once either side was merged elsewhere: its length no longer adds up
            if not a or not b or len(a) + len(b) != size:
                continue
            sym[left] = merged = a + b
            sym[right] = ""
            r = nxt[right]
            nxt[left] = r
            if r >= 0:
                prv[r] = left
            p = prv[left]
            if p >= 0:
                pair = sym[p] + merged
                tid = t2i.get(pair)
                if tid is not None:
                    push(heap, (-scores[tid], p, left, len(pair)))
            if r >= 0:
                pair = merged + sym[r]
                tid = t2i.get(pair)
                if tid is not None:
                    push(heap, (-scores[tid], left, r, len(pair)))
        # Every merge makes a vocabulary token, so a final symbol without an id is a single character
        # the vocabulary lacks: it goes out as its UTF-8 bytes (<0xNN> tokens).
        byte_ids = self._byte_ids
        i = 0
        while i != -1:
            s = sym[i]
            tid = t2i.get(s)
            if tid is not None:
                out.append(tid)
            else:
                out.extend(b for b in (byte_ids[c] for c in s.encode("utf-8")) if b is not None)
            i = nxt[i]

    # ---- decoding

    def token_to_piece(self, token_id: int, special: bool = True) -> bytes:
        """The bytes a token renders as (llama.cpp's token_to_piece). With special=False, CONTROL and
        UNKNOWN tokens render as nothing; USER_DEFINED tokens (e.g. "<think>") always render."""
        attr = self._attr[token_id]
        if attr & (ATTR_CONTROL | ATTR_UNKNOWN) and not special:
            return b""
        piece = self._pieces[token_id]
        if piece is None:
            piece = self._pieces[token_id] = self._render(token_id, attr)
        return piece

    def _render(self, token_id: int, attr: int) -> bytes:
        text = self.tokens[token_id]
        if attr & (ATTR_CONTROL | ATTR_UNKNOWN | ATTR_USER_DEFINED):
            return text.encode("utf-8")
        if attr & ATTR_NORMAL:
            if self.model == "llama":
                return text.replace(_SPACE, " ").encode("utf-8")
            # byte-level: each character stands for one byte; a character outside GPT-2's alphabet
            # (a raw added token) stands for itself
            u2b = _UNICODE_TO_BYTE
            return b"".join(bytes((u2b[c],)) if c in u2b else c.encode("utf-8") for c in text)
        if attr & ATTR_BYTE and len(text) == 6 and text.startswith("<0x"):
            return bytes((int(text[3:5], 16),))
        return b""  # UNUSED / UNDEFINED render as nothing, as in llama.cpp

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids` (llama.cpp's detokenize without clean-up). skip_special drops a leading BOS,
        a trailing EOS (when the vocabulary adds them) and CONTROL tokens."""
        ids = list(ids)
        # SentencePiece: the space encode put in front of the text is taken off again, unless the
        # ids start with a BOS that is being dropped (llama.cpp keeps the space then)
        strip_space = self._add_space_prefix
        if skip_special and self.add_bos and ids and ids[0] == self.bos_id:
            ids = ids[1:]
            strip_space = False
        if skip_special and self.add_eos and ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        pieces = [self.token_to_piece(i, special=not skip_special) for i in ids]
        if strip_space and pieces and pieces[0].startswith(b" "):
            pieces[0] = pieces[0][1:]
        return b"".join(pieces).decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special: bool = True) -> StreamDecoder:
        """Incremental decoder for generated ids; CONTROL tokens are hidden by default, as in llama-server."""
        return StreamDecoder(self, skip_special)

    # ---- vocabulary facts

    def is_eog(self, token_id: int) -> bool:
        return token_id in self.eot_ids

    def is_control(self, token_id: int) -> bool:
        return bool(self._attr[token_id] & ATTR_CONTROL)

    def token_id(self, text: str) -> int | None:
        """The id of a token by its exact vocabulary text, or None."""
        return self._token_to_id.get(text)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Renders the chat template (the file's, or ChatML when it has none); kwargs reach the
        template as variables (e.g. enable_thinking=False, tools=[...])."""
        return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt, **kwargs)
