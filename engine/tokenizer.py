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

`decode` renders what llama.cpp's detokenize renders; its space clean-up (the vocabulary's
clean_spaces) only when asked for, since it is not what llama-server streams and it would break the
encode -> decode round trip.
"""

from __future__ import annotations

import codecs
import heapq
import re
from collections.abc import Iterable
from typing import Any, NamedTuple

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
# These are llama.cpp's (src/llama-vocab.cpp, llm_tokenizer_bpe), keyed by its LLAMA_VOCAB_PRE_TYPE_*
# names in lower case, in its adapted forms: (?i:'s|...) is spelled out as (?:'[sS]|...) so that
# case-folding corner cases (U+017F matching 's') behave as llama.cpp's hand-written splitters do. Where
# the text here differs from llama.cpp's, a comment says what llama.cpp runs and why the two split alike
# (tests/data/vocab/pre-tokenizer-splits.json holds llama.cpp's pieces of sample texts for every name).
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_RE = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_RE = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEEPSEEK3_CJK = r"[一-龥぀-ゟ゠-ヿ]+"
_DEEPSEEK3_RE = (
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp runs a regex without \p{..} classes on the code points with each non-ASCII whitespace
# character replaced by U+000B, so its literal ranges never match one (U+3000 is in "ࠀ-一" but never
# found there). Here the ranges leave them out: "&&[^\s]" below, "、-。" for "　-。" in deepseek_llm.
_DEEPSEEK_CJK = r"[一-龥ࠀ-一가-퟿&&[^\s]]+"
_PORO_RE = r" ?[^(\s|.,!?…。，、।۔،)]+"
# Letter case: llama.cpp's character classes have none, its \p{Lu}, \p{Ll}, \p{Lt}, \p{Lm} and \p{Lo} all
# stand for \p{L} (unicode_regex_split's k_ucat_enum), so tokenizer.json's [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]
# (upper) and [\p{Ll}\p{Lm}\p{Lo}\p{M}] (lower) both match any letter or mark there (youtu, tiny_aya).
_ANY_CASE = r"[\p{L}\p{M}]"
# tekken, gpt-4o: llama.cpp's adapted upper/lower runs, which know case for ASCII letters only and leave
# out marks; kept as is.
_ASCII_UPPER, _ASCII_LOWER = r"((?=[\p{L}])([^a-z]))", r"((?=[\p{L}])([^A-Z]))"
_GPT4O_TAIL = r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def _cased_words(upper: str, lower: str, contraction: str = "") -> str:
    """A word as an upper-case run then a lower-case run, either of them possibly empty."""
    lead = r"[^\r\n\p{L}\p{N}]?"
    return f"{lead}{upper}*{lower}+{contraction}|{lead}{upper}+{lower}*{contraction}"


# llama.cpp's hand-written splitter for afmoe's and tiny_aya's digits (unicode_regex_split_custom_afmoe):
# a run of digits in groups of three from the right, the leading group of 1-2; the text before a run
# goes with its first group (its piece starts where the previous one ended), the text after the last
# run is a piece of its own. The second alternative takes that last piece in one match.
_AFMOE_DIGITS = r"\P{N}*\p{N}{1,3}(?=(?:\p{N}{3})*(?!\p{N}))|\P{N}+\z"
# Kimi-K2: llama.cpp's hand-written splitter (unicode_regex_split_custom_kimi_k2) for K2's regex, whose
# Han set is these ranges (unicode_cpt_is_han) and whose words, as there, are any non-Han letters.
_HAN = (
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df\U0002a700-\U0002ebef\U0002f800-\U0002fa1f"
)
_KIMI_RE = (
    f"[{_HAN}]+|[^\\r\\n\\p{{L}}\\p{{N}}]?[\\p{{L}}&&[^{_HAN}]]+"
    r"(?:'(?:[sStTmMdD]|[rR][eE]|[vV][eE]|[lL][lL]))?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_REGEXES: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_RE, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "llama3": (_LLAMA3_RE,),  # also llama.cpp's DBRX, SMAUG and CHATGLM4
    "jais2": (
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
        r"|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)"
        r"|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}",
    ),
    "deepseek_llm": (
        r"[\r\n]",
        # (the \u escapes: characters that NFC would change, spelled out so an editor keeps them)
        (
            "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕ"
            "ἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\u1f7dᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌῐ-\u1fd3ῖ-\u1fdbῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u2126ℨ\u212a-ℭ"
            "ℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+"
        ),
        r"\s?[!-/:-~！-／：-～‘-‟、-。]+",  # llama.cpp: "　-。", whose U+3000 is whitespace (above)
        r"\s+\z",  # llama.cpp: "\s+$", std::regex's end of the piece (Oniguruma's $ is end of line)
        _DEEPSEEK_CJK,
        r"\p{N}+",
    ),
    "deepseek_coder": (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _DEEPSEEK_CJK, r"\p{N}"),
    "deepseek3_llm": (r"\p{N}{1,3}", _DEEPSEEK3_CJK, _DEEPSEEK3_RE),  # also HUNYUAN_DENSE, JOYAI_LLM, HY_V4
    "spark2_5": (
        r"\p{N}{1,3}",
        _DEEPSEEK3_CJK,
        (
            r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
            r"| ?[\p{P}\p{S}]+|[\r\n]|\s+(?!\S)|\s+"
        ),
        r"\p{N}",
    ),
    "youtu": (
        r"[가-힣ㄱ-ㆎ]+|[！…“”‘’—：；，、-〿︰-﹏]+|[ㄅ-ㄯ]+|[一-龥぀-ゟ゠-ヿ]+",
        _cased_words(_ANY_CASE, _ANY_CASE, _CONTRACTIONS + "?")
        + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_RE, r"[0-9][0-9][0-9]"),
    "starcoder": (r"\p{N}", _GPT2_RE),  # also REFACT, COMMAND_R, SMOLLM, CODESHELL, EXAONE, MINERVA, MELLUM2
    "gpt2": (_GPT2_RE,),  # also MPT, OLMO, JAIS, TRILLION, GRANITE_DOCLING
    "qwen2": (_QWEN2_RE,),  # also STABLELM2, HUNYUAN, SOLAR_OPEN, GROK_2
    "qwen35": (
        _CONTRACTIONS
        + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "poro": (_PORO_RE,),  # also BLOOM, GPT3_FINNISH
    "viking": (_PORO_RE, r"\p{N}"),
    "tekken": (
        _cased_words(_ASCII_UPPER, _ASCII_LOWER)
        + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "chameleon": (
        r"<sentinel:[0-9]+>",
        r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
        r"([\t\n]|    |  )",
        r"\p{N}",
        r"[\p{P}!-/:-@\[-`{-~]",
        _GPT2_RE,
    ),
    # gpt4o: also MINIMAX_M2
    "gpt4o": (_cased_words(_ASCII_UPPER, _ASCII_LOWER, _CONTRACTIONS + "?") + _GPT4O_TAIL,),
    "granite_emb_multi": (  # gpt4o with marks in the letter runs
        _cased_words(r"((?=[\p{L}\p{M}])([^a-z]))", r"((?=[\p{L}\p{M}])([^A-Z]))", _CONTRACTIONS + "?")
        + _GPT4O_TAIL,
    ),
    "tiny_aya": (
        _AFMOE_DIGITS,  # llama.cpp runs its afmoe splitter for tokenizer.json's \d{1,3}(?=(?:\d{3})*\b)
        _cased_words(_ANY_CASE, _ANY_CASE, _CONTRACTIONS + "?") + _GPT4O_TAIL,
    ),
    "kimi_k2": (_KIMI_RE,),
    # llama.cpp: (?=(\d{3})+(?!\d)), matched on the code points, where std::regex's \d is ASCII only
    "superbpe": (r"\p{N}+", r"(?=(?:[0-9]{3})+(?![0-9]))"),
    "bailingmoe": (
        (
            r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
            r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
        ),
    ),
    "seed_coder": (
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "ufakzeka": (r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "afmoe": (
        _AFMOE_DIGITS,  # llama.cpp: "\p{AFMoE_digits}", its hand-written splitter
        r"[一-鿿㐀-䶿豈-﫿぀-ゟ゠-ヿ･-ﾟ⼀-⿟เ-๿຀-໿ក-៿က-႟ꩠ-ꩿꧠ-꧿가-힯ᄀ-ᇿ]+",
        _DEEPSEEK3_RE,
    ),
    "laguna": (r"[^\n]+|[\n]+", _QWEN2_RE),
    "exaone_moe": (
        _CONTRACTIONS
        + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?"
        r"|\s*[\r\n]|\s+(?!\S)|\s+",
    ),
    "minicpm5": (
        r"\p{N}{1,3}",
        _CONTRACTIONS
        + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
}


class _Pre(NamedTuple):
    """What llama.cpp's vocab loader sets for one `tokenizer.ggml.pre` name."""

    regexes: str  # a key of _PRE_REGEXES
    # a whole pre-token that is itself in the vocabulary is emitted as one token
    ignore_merges: bool = False
    add_bos: bool = False  # when the file has no tokenizer.ggml.add_bos_token
    # llama_detokenize's clean-up of " ," and " 's" (decode(clean_spaces=True))
    clean_spaces: bool = True
    default_bos: bool = True  # False: no BOS id unless the file names one (llama.cpp's 11 otherwise)


def _each(names: str, pre: _Pre) -> dict[str, _Pre]:
    return dict.fromkeys(names.split(), pre)


# `tokenizer.ggml.pre` -> _Pre, in the order of llama.cpp's vocab loader (llama_vocab::impl::load).
# llama.cpp's add_sep (jina-v1-en, jina-v2-code, roberta-bpe) and the <mask> lstrip of jina-v2-* only
# matter to reranking and embedding models, which nextn does not run.
_PRE_TYPES: dict[str, _Pre] = {
    **_each("default", _Pre("default")),
    **_each("minicpm5", _Pre("minicpm5", ignore_merges=True)),
    **_each(
        "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano",
        _Pre("llama3", ignore_merges=True, add_bos=True),
    ),
    **_each("deepseek-llm", _Pre("deepseek_llm", clean_spaces=False)),
    **_each("deepseek-coder", _Pre("deepseek_coder", clean_spaces=False)),
    **_each("deepseek-v3", _Pre("deepseek3_llm", clean_spaces=False)),
    **_each("spark2_5", _Pre("spark2_5", clean_spaces=False)),
    **_each("youtu", _Pre("youtu", ignore_merges=True, clean_spaces=False)),
    **_each("falcon", _Pre("falcon")),
    **_each("mpt", _Pre("gpt2")),
    **_each("starcoder", _Pre("starcoder")),
    **_each(
        "gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert", _Pre("gpt2")
    ),
    **_each("jais-2", _Pre("jais2")),
    **_each("jina-v1-en jina-v2-code roberta-bpe", _Pre("gpt2")),
    **_each("refact", _Pre("starcoder")),
    **_each("command-r", _Pre("starcoder", clean_spaces=False)),
    **_each("qwen2 deepseek-r1-qwen kormo f2llmv2", _Pre("qwen2", clean_spaces=False)),
    **_each("qwen35", _Pre("qwen35", clean_spaces=False)),
    **_each("stablelm2", _Pre("qwen2")),
    **_each("olmo", _Pre("gpt2")),
    **_each("dbrx smaug-bpe", _Pre("llama3")),
    **_each("poro-chat", _Pre("poro", clean_spaces=False)),
    **_each("chatglm-bpe", _Pre("llama3", default_bos=False)),
    **_each("glm4 glm5", _Pre("llama3", ignore_merges=True, default_bos=False)),
    **_each("viking", _Pre("viking", clean_spaces=False)),
    **_each("jais", _Pre("gpt2")),
    **_each("tekken", _Pre("tekken", ignore_merges=True, add_bos=True, clean_spaces=False)),
    **_each("smollm", _Pre("starcoder", clean_spaces=False)),
    **_each("codeshell", _Pre("starcoder")),
    **_each("bloom gpt3-finnish", _Pre("poro")),
    **_each("exaone", _Pre("starcoder")),
    **_each("exaone4", _Pre("gpt2")),
    **_each("exaone-moe", _Pre("exaone_moe")),
    **_each("chameleon", _Pre("chameleon", add_bos=True, clean_spaces=False)),
    **_each("minerva-7b", _Pre("starcoder")),
    **_each("megrez", _Pre("qwen2")),
    **_each("gpt-4o llama4 kanana2 talkie", _Pre("gpt4o", clean_spaces=False)),
    **_each("granite-embed-multi-97m", _Pre("granite_emb_multi", ignore_merges=True, clean_spaces=False)),
    **_each("tiny_aya cohere2moe", _Pre("tiny_aya", clean_spaces=False)),
    **_each("superbpe", _Pre("superbpe", clean_spaces=False)),
    **_each("trillion granite-docling", _Pre("gpt2", clean_spaces=False)),
    **_each("bailingmoe bailingmoe2 llada-moe", _Pre("bailingmoe", clean_spaces=False)),
    **_each("seed-coder", _Pre("seed_coder", clean_spaces=False)),
    **_each("hunyuan", _Pre("qwen2", clean_spaces=False)),
    **_each("hunyuan-dense hy_v4 joyai-llm", _Pre("deepseek3_llm", clean_spaces=False)),
    **_each("kimi-k2", _Pre("kimi_k2", clean_spaces=False)),
    **_each("ufakzeka", _Pre("ufakzeka", clean_spaces=False)),
    **_each("grok-2", _Pre("qwen2", clean_spaces=False)),
    **_each("afmoe", _Pre("afmoe", clean_spaces=False)),
    **_each("laguna", _Pre("laguna", clean_spaces=False)),
    **_each("minimax-m2", _Pre("gpt4o", clean_spaces=False)),
    **_each("solar-open", _Pre("qwen2", clean_spaces=False)),
    **_each("mellum2", _Pre("starcoder")),
}
# Names llama.cpp maps to a BPE that is not byte-level: merges over raw UTF-8 with "▁" for spaces and
# <0xNN> byte tokens (its byte_encode = false), like Gemma 4's; no architecture nextn runs uses them.
_NOT_BYTE_LEVEL = "raw UTF-8 BPE (llama.cpp's byte_encode = false), which nextn does not implement"
_REFUSED: dict[str, str] = dict.fromkeys(
    ("gemma4", "granite-embed-multi-311m", "mmbert", "sarvam-moe", "whitespace"), _NOT_BYTE_LEVEL
)

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
# Letters, marks, digits, punctuation and symbols that Unicode 16.0 added, which llama.cpp's
# unicode-data.cpp (Unicode 15) classes as unassigned: every code point whose class there (its
# unicode_ranges_flags) differs from the class the `tokenizers` regex engine gives it (see pre_tokenize).
_UNICODE16 = re.compile(
    "[\u0897\u1b4e\u1b4f\u1b7f\u1c89\u1c8a\u2427-\u2429\u31e4\u31e5\ua7cb-\ua7cd\ua7da-\ua7dc"
    "\U000105c0-\U000105f3\U00010d40-\U00010d65\U00010d69-\U00010d85\U00010d8e\U00010d8f"
    "\U00010ec2-\U00010ec4\U00010efc\U00011380-\U00011389\U0001138b\U0001138e\U00011390-\U000113b5"
    "\U000113b7-\U000113c0\U000113c2\U000113c5\U000113c7-\U000113ca\U000113cc-\U000113d5\U000113d7"
    "\U000113d8\U000113e1\U000113e2\U000116d0-\U000116e3\U00011bc0-\U00011be1\U00011bf0-\U00011bf9"
    "\U00011f5a\U00013460-\U000143fa\U00016100-\U00016139\U00016d40-\U00016d79\U00018cff"
    "\U0001cc00-\U0001ccf9\U0001cd00-\U0001ceb3\U0001e5d0-\U0001e5fa\U0001e5ff\U0001f8b2-\U0001f8bb"
    "\U0001f8c0\U0001f8c1\U0001fa89\U0001fa8f\U0001fabe\U0001fac6\U0001fadc\U0001fadf\U0001fae9"
    "\U0001fbcb-\U0001fbef]"
)


def _clean_spaces(text: bytes) -> bytes:
    """llama_detokenize's three clean-up passes, byte for byte (llama_vocab::impl::detokenize)."""
    # 1: no space before ? ! . ,
    out = bytearray(text[:1])
    for i in range(1, len(text)):
        if text[i - 1] == 0x20 and text[i] in b"?!.,":
            out.pop()
        out.append(text[i])
    # 2: " ' " -> "'"; the space after it is gone, so a following " ' " keeps its spaces
    t, out = bytearray(out), bytearray(out[:1])
    i = 1
    while i < len(t):
        x = t[i]
        if x == 0x27 and i + 1 < len(t) and t[i - 1] == 0x20 and t[i + 1] == 0x20:
            out.pop()
            i += 1
            t[i] = 0  # as llama.cpp overwrites it
        out.append(x)
        i += 1
    # 3: " 's", " 'm", " 're", " 've" lose their space (" 't", " 'd", " 'll" keep it)
    t, out = out, bytearray(out[:1])
    for i in range(1, len(t)):
        if (
            t[i - 1] == 0x20
            and t[i] == 0x27
            and i + 1 < len(t)
            and (t[i + 1] in b"sm" or (i + 2 < len(t) and t[i + 1 : i + 3] in (b"re", b"ve")))
        ):
            out.pop()
        out.append(t[i])
    return bytes(out)


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
        # llama.cpp's defaults per model (and BPE pre-tokenizer), overridden by the file; ids outside the
        # vocabulary are dropped
        if self.model == "llama":
            ids: dict[str, int | None] = {"bos": 1, "eos": 2, "unk": 0}
            add_bos, self._add_space_prefix = True, True
            self.pre = "default"
            self.clean_spaces: bool = False
        else:
            pre = meta.get("tokenizer.ggml.pre") or "default"
            if pre not in _PRE_TYPES:
                why = f" ({_REFUSED[pre]})" if pre in _REFUSED else ""
                raise ModelLoadError(
                    f"pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported{why}; "
                    f"supported: {', '.join(sorted(_PRE_TYPES))}"
                )
            self.pre = pre
            p = _PRE_TYPES[pre]
            self._regex_set, self._ignore_merges = p.regexes, p.ignore_merges
            self.clean_spaces = p.clean_spaces
            ids = {"bos": 11 if p.default_bos else None, "eos": 11, "unk": None}
            add_bos, self._add_space_prefix = p.add_bos, False
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
        regexes = _PRE_REGEXES[self._regex_set]
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.pre_tokenizer = pre_tokenizers.Sequence([*splits, byte_level])
        self._hf = hf
        self._hf_split = pre_tokenizers.Sequence(splits)
        # For text with characters new in Unicode 16 (see _UNICODE16): each split, with whether its
        # regex goes by character classes, and a tokenizer over the same model that takes the pieces
        # as they are.
        self._splits = [(sp, "\\p{" in r or "\\P{" in r) for sp, r in zip(splits, regexes)]
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

    def pre_tokenize(self, text: str) -> list[str]:
        """The pieces a byte-level BPE vocabulary's pre-tokenizer splits `text` (one fragment between
        special tokens) into, as llama.cpp's unicode_regex_split does; merges never cross them."""
        if text.isascii() or not _UNICODE16.search(text):
            return [piece for piece, _ in self._hf_split.pre_tokenize_str(text)]
        # Characters that Unicode 16 added: llama.cpp's character tables (Unicode 15) do not know them,
        # so its splitter treats them as unassigned, while the regex engine of `tokenizers` knows them as
        # letters, marks, digits, punctuation or symbols. A regex that goes by character classes splits a
        # copy where each of them is an always-unassigned code point (U+0378, same length in
        # characters), then the original piece is cut at those places. Regexes of literal characters
        # match code points as they are, in llama.cpp too.
        pieces = [text]
        for split, by_class in self._splits:
            out = []
            for p in pieces:
                q = _UNICODE16.sub("\u0378", p) if by_class else p
                out.extend(p[a:b] for _, (a, b) in split.pre_tokenize_str(q))
            pieces = out
        return pieces

    def _encode_unicode16(self, text: str) -> list[int]:
        """Byte-level BPE of text holding characters that Unicode 16 added (see pre_tokenize)."""
        return self._hf_pieces.encode(
            self.pre_tokenize(text), is_pretokenized=True, add_special_tokens=False
        ).ids

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

    def decode(self, ids: Iterable[int], skip_special: bool = False, clean_spaces: bool = False) -> str:
        """Text of `ids` (llama.cpp's detokenize). skip_special drops a leading BOS, a trailing EOS
        (when the vocabulary adds them) and CONTROL tokens. clean_spaces: llama_detokenize's clean-up
        (" ," -> ",", " 's" -> "'s"), where the vocabulary's pre-tokenizer asks for it (self.clean_spaces);
        off by default, as llama-server renders text token by token without it."""
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
        data = b"".join(pieces)
        if clean_spaces and self.clean_spaces:
            data = _clean_spaces(data)
        return data.decode("utf-8", errors="replace")

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
