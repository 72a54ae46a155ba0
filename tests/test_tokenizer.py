"""Tokenizer from GGUF metadata: ids as llama.cpp gives them, decoding, streaming, vocabulary facts.

The reference ids are llama.cpp's own test vectors (tests/data/vocab, from llama.cpp's models/ folder);
the pre-tokenizers those do not cover are checked against llama.cpp's pieces of sample texts
(tests/data/vocab/pre-tokenizer-splits.json).
"""

import time

import pytest
from nextn.errors import ModelLoadError
from nextn.tokenizer import Tokenizer
from tokenizer_data import TINY_SPECIALS, pre_splits, read_vectors, tiny_meta, vocab_tokenizer

# qwen2 is the qwen35 vocabulary with the older pre-tokenizer regex; it costs another ~6 s to load, so
# it runs with the slow cases, as does command-r's 256k-token vocabulary (starcoder's regexes, which
# refact and starcoder run by default).
VOCABS = [
    "qwen35",
    "llama-bpe",
    "llama-spm",
    "phi-3",  # SentencePiece too
    "gpt-2",
    "mpt",
    "falcon",
    "starcoder",
    "refact",
    "deepseek-coder",
    "deepseek-llm",
    pytest.param("qwen2", marks=pytest.mark.slow),
    pytest.param("command-r", marks=pytest.mark.slow),
]
PRE = pre_splits()
PRE_NAMES = sorted(PRE["names"])  # llama.cpp's, less those whose BPE is not byte-level

MIXED = [
    "",
    " ",
    "Hello world",
    "def add(a, b):\n    return a + b  # sum\n\n\nprint(add(1, 2))\n",
    "for (int i = 0; i < n; ++i) {\n\tx[i] = y[i] * 2.5f;\n}",
    "我想在apple工作1314151天～ 日本語のテキスト 한국어 텍스트",
    "emoji 🦙🚀 😶‍🌫️ 👍🏽 🇩🇪 ✅",
    "   leading, trailing   \n\n \t\t mixed \r\n whitespace    ",
    "numbers 3.14159 1,000,000 0x1F 2024-05-01 333333333 ½ ① ٣",
    "e\u0301 combining, \u00a0nbsp, zero\u200bwidth, \u3000ideographic space",
    "it's, they'RE, we'VE, I'm, she'll, he'd DON'T",
    "<|im_start|>user\nhi<|im_end|> </s> <s> [PAD151700] <|endoftext|>",
    "▁ Ġ Ċ <0x41> literal marker characters",
]


@pytest.mark.parametrize("name", VOCABS)
def test_llama_cpp_vectors(name):
    tok = vocab_tokenizer(name)
    failures = []
    for text, expected in read_vectors(name).items():
        got = tok.encode(text, add_special=False, parse_special=False)  # as test-tokenizer-0 calls it
        if got != expected:
            failures.append((text, expected, got))
    assert not failures, f"{len(failures)} vectors differ, first: {failures[0]}"


@pytest.mark.parametrize("name", ["tiny", "qwen35", "llama-bpe", "llama-spm"])
def test_mixed_text_round_trips(name):
    tok = Tokenizer.from_metadata(tiny_meta()) if name == "tiny" else vocab_tokenizer(name)
    # SentencePiece writes spaces as "▁", so a literal "▁" comes back as a space; and it puts a space
    # in front of every text fragment, so with parse_special a control token inside the text
    # ("a</s>b" -> "a</s> b") does not round-trip either. Both are so in llama.cpp too.
    spm = tok.model == "llama"
    for parse_special in (False,) if spm else (False, True):
        for text in MIXED if not spm else [t for t in MIXED if "▁" not in t]:
            ids = tok.encode(text, add_special=False, parse_special=parse_special)
            assert all(0 <= i < tok.n_vocab for i in ids)
            assert tok.decode(ids) == text, (parse_special, text)
            if tok.model == "gpt2":
                assert b"".join(tok.token_to_piece(i) for i in ids) == text.encode()


@pytest.mark.parametrize("name", ["qwen35", "llama-bpe"])
def test_characters_new_in_unicode_16(name):
    # U+14298 (Egyptian hieroglyph, Unicode 16) is a letter to the `tokenizers` regex engine but
    # unassigned to llama.cpp, which then keeps the apostrophe with it: "𔊘'" + "hL", not "𔊘" + "'hL".
    # The ids are llama.cpp's (its llama_tokenize on this vocabulary).
    assert vocab_tokenizer(name).encode("\U00014298'hL", add_special=False) == [172, 242, 232, 246, 6, 71, 43]


def test_special_tokens_only_with_parse_special():
    tok = vocab_tokenizer("qwen35")
    text = "<|im_start|>user\nhi<|im_end|>"
    parsed = tok.encode(text, add_special=False, parse_special=True)
    assert parsed[0] == 151644 and parsed[-1] == 151645
    plain = tok.encode(text, add_special=False, parse_special=False)
    assert 151644 not in plain and 151645 not in plain
    # USER_DEFINED tokens are split out even without parse_special, as in llama.cpp
    assert tok.encode("a[PAD151700]b", add_special=False) == [64, 151700, 65]
    # "</s>" is a NORMAL token in Qwen's vocabulary that llama.cpp turns into an end-of-generation
    # CONTROL token: only parse_special finds it
    assert tok.encode("</s>", add_special=False, parse_special=True) == [128247]
    assert tok.encode("</s>", add_special=False) != [128247]


@pytest.mark.parametrize("name", ["qwen35", "llama-spm"])
def test_lone_surrogates_become_replacement_characters(name):
    tok = vocab_tokenizer(name)
    assert tok.encode("a\ud83db", add_special=False) == tok.encode("a\ufffdb", add_special=False)


def test_skip_special_in_decode():
    tok = vocab_tokenizer("qwen35")
    ids = tok.encode("<|im_start|>assistant\nok[PAD151700]<|im_end|>", add_special=False, parse_special=True)
    assert tok.decode(ids) == "<|im_start|>assistant\nok[PAD151700]<|im_end|>"
    assert tok.decode(ids, skip_special=True) == "assistant\nok[PAD151700]"  # USER_DEFINED stays


def test_bos_handling():
    bpe = vocab_tokenizer("llama-bpe")  # llama3 pre: BOS added
    assert bpe.add_bos and bpe.encode("Hi")[0] == 128000 == bpe.bos_id
    assert bpe.encode("Hi", add_special=False)[0] != 128000
    qwen = vocab_tokenizer("qwen35")  # add_bos_token = false in the file
    assert not qwen.add_bos and qwen.encode("Hi") == qwen.encode("Hi", add_special=False)
    assert qwen.encode("") == [] and bpe.encode("") == [128000]

    spm = vocab_tokenizer("llama-spm")
    ids = spm.encode("Hello")
    assert ids == [1, 15043]  # BOS, "▁Hello": SentencePiece's leading space
    # llama.cpp's detokenize keeps that space after a BOS and drops it without one
    assert spm.decode(ids) == "<s> Hello"
    assert spm.decode(ids, skip_special=True) == " Hello"
    assert spm.decode(ids[1:]) == "Hello"
    # after a special token the next text fragment gets the SentencePiece space again
    a, b = spm.encode("a", add_special=False), spm.encode("b", add_special=False)  # "▁a", "▁b"
    assert spm.encode("a</s>b", add_special=False, parse_special=True) == a + [2] + b


@pytest.mark.parametrize(
    "name, eog",
    [
        ("qwen35", {151643, 151645, 128247}),  # <|endoftext|>, <|im_end|>, "</s>"; as llama.cpp lists them
        ("llama-bpe", {128001, 128009}),  # <|end_of_text|>, <|eot_id|>
        ("llama-spm", {2}),
    ],
)
def test_end_of_generation_ids(name, eog):
    tok = vocab_tokenizer(name)
    assert tok.eot_ids == eog
    assert all(tok.is_eog(i) for i in eog) and not tok.is_eog(0)


def test_stream_decoder_holds_back_split_characters():
    tok = vocab_tokenizer("qwen35")
    text = "a🦙b😶‍🌫️!"
    ids = tok.encode(text, add_special=False)
    assert len(ids) > 4  # the emoji come out as several byte-level tokens
    dec = tok.stream_decoder()
    outs = [dec.push(i) for i in ids]
    outs.append(dec.flush())
    assert "".join(outs) == text
    assert "\ufffd" not in "".join(outs)
    # tokens that end inside a character yield nothing until the character completes
    partial = [i for i, piece in zip(ids, outs) if piece == ""]
    assert partial


def test_stream_decoder_byte_tokens_and_invalid_bytes():
    tok = Tokenizer.from_metadata(tiny_meta())
    dec = tok.stream_decoder()
    llama = "🦙".encode()  # 4 bytes, 4 tokens in the tiny vocabulary (id == byte)
    assert [dec.push(b) for b in llama] == ["", "", "", "🦙"]
    assert dec.push(0xF0) == ""  # a lone lead byte ...
    assert dec.push(ord("x")) == "\ufffdx"  # ... that never completes becomes U+FFFD
    assert dec.push(0xE2) == "" and dec.flush() == "\ufffd"


def test_stream_decoder_hides_control_tokens():
    tok = vocab_tokenizer("qwen35")
    dec = tok.stream_decoder()
    assert dec.push(151645) == ""  # <|im_end|>, as llama-server streams it
    assert tok.stream_decoder(skip_special=False).push(151645) == "<|im_end|>"


def test_tiny_vocabulary():
    tok = Tokenizer.from_metadata(tiny_meta())
    n = 256 + len(TINY_SPECIALS)
    assert tok.n_vocab == n
    # no merges: one token per byte, id == byte value
    text = "Hi é 🦙\n"
    assert tok.encode(text) == list(text.encode())
    assert tok.decode(tok.encode(text)) == text
    chat = "<|im_start|>user\nhi<|im_end|>\n"
    ids = tok.encode(chat, parse_special=True)
    assert ids[0] == 257 and 258 in ids
    assert tok.decode(ids, skip_special=True) == "user\nhi\n"
    assert tok.eot_ids == {256, 258}  # <|endoftext|> and <|im_end|> (also the eos id)
    assert tok.bos_id == 256 and not tok.add_bos

    # a few merges, applied by rank: "Ġ t" then "h e" then "Ġt he"
    merged = Tokenizer.from_metadata(tiny_meta(merges=("Ġ t", "h e", "Ġt he")))
    space, he, the = (merged.token_id(s) for s in ("Ġ", "he", "Ġthe"))
    assert (space, he, the) == (ord(" "), 257, 258)  # "Ġ" is GPT-2's spelling of the byte 0x20
    assert merged.encode(" the hen") == [the, space, he, ord("n")]
    assert merged.encode(" they") == [the, ord("y")]
    assert merged.decode(merged.encode(" the hen")) == " the hen"
    assert merged.encode("<|im_end|>", parse_special=True) == [261]


@pytest.mark.parametrize("pre", PRE_NAMES)
def test_every_pre_tokenizer_splits_losslessly(pre):
    tok = Tokenizer.from_metadata(tiny_meta(merges=("Ġ t", "h e", "Ġt he"), **{"tokenizer.ggml.pre": pre}))
    for text in MIXED:
        ids = tok.encode(text, add_special=False)
        assert tok.decode(ids) == text
    assert tok.encode(" the") == [258]


@pytest.mark.parametrize("pre", PRE_NAMES)
def test_pre_tokenizer_as_llama_cpp(pre):
    """llama.cpp's pieces of the sample texts, and the flags its vocab loader sets for the name."""
    want = PRE["names"][pre]
    meta = tiny_meta(**{"tokenizer.ggml.pre": pre})
    del meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.add_bos_token"]  # to see the defaults
    # "zzqj": a token that no merge makes, so it comes out whole only where merges are ignored
    meta["tokenizer.ggml.tokens"] = [*meta["tokenizer.ggml.tokens"], "zzqj"]
    meta["tokenizer.ggml.token_type"] = [*meta["tokenizer.ggml.token_type"], 1]
    tok = Tokenizer.from_metadata(meta)
    flags = {
        "add_bos": tok.add_bos,
        "bos": tok.bos_id is not None,
        "ignore_merges": tok.encode("zzqj", add_special=False) == [tok.n_vocab - 1],
        "clean_spaces": tok.clean_spaces,
    }
    assert flags == {k: v for k, v in want.items() if k != "splits"}
    failures = [
        (text, pieces, tok.pre_tokenize(text))
        for text, pieces in zip(PRE["texts"], PRE["splits"][want["splits"]])
        if tok.pre_tokenize(text) != pieces
    ]
    assert not failures, (
        f"{len(failures)} texts split otherwise, first (text, llama.cpp, nextn): {failures[0]}"
    )


def test_clean_spaces_as_llama_detokenize():
    # llama_detokenize's text for these ids (gpt-2's pre-tokenizer asks for the clean-up)
    gpt2 = vocab_tokenizer("gpt-2")
    text = "a , b . c ! d ? e ' f ' g 's h 'm i 're j 've k 't l 'd m 'll x ' ' ' y"
    ids = gpt2.encode(text, add_special=False)
    assert gpt2.decode(ids) == text
    assert gpt2.decode(ids, clean_spaces=True) == "a, b. c! d? e'f'g's h'm i're j've k 't l 'd m 'll x'''y"
    qwen = vocab_tokenizer("qwen35")  # qwen35's does not
    assert not qwen.clean_spaces
    assert qwen.decode(qwen.encode(text, add_special=False), clean_spaces=True) == text


def test_unsupported_vocabularies_are_refused():
    with pytest.raises(ModelLoadError, match="tokenizer model 'bert'.*not supported"):
        Tokenizer.from_metadata(tiny_meta(**{"tokenizer.ggml.model": "bert"}))
    with pytest.raises(ModelLoadError, match="tokenizer model None"):
        Tokenizer.from_metadata({"general.architecture": "qwen3"})
    with pytest.raises(ModelLoadError, match="pre-tokenizer 'made-up'.*qwen35") as e:
        Tokenizer.from_metadata(tiny_meta(**{"tokenizer.ggml.pre": "made-up"}))
    # the names offered are llama.cpp's, less the ones refused below
    assert sorted(str(e.value).split("supported: ")[1].split(", ")) == PRE_NAMES
    for pre in PRE["not_byte_level"]:
        with pytest.raises(ModelLoadError, match=f"pre-tokenizer '{pre}'.*not supported .raw UTF-8 BPE"):
            Tokenizer.from_metadata(tiny_meta(**{"tokenizer.ggml.pre": pre}))
    with pytest.raises(ModelLoadError, match="no vocabulary"):
        Tokenizer.from_metadata(tiny_meta(**{"tokenizer.ggml.tokens": []}))


def test_control_looking_tokens_end_generation():
    # a converter that typed <|im_end|> NORMAL: llama.cpp still ends generation on it and makes it CONTROL
    meta = tiny_meta(**{"tokenizer.ggml.token_type": [1] * 259, "tokenizer.ggml.eos_token_id": 256})
    tok = Tokenizer.from_metadata(meta)
    assert tok.eot_ids == {256, 258}
    assert tok.is_control(258) and not tok.is_control(257)
    assert tok.encode("<|im_start|>", parse_special=True) != [257]  # a NORMAL token is never parsed


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen35", "llama-spm"])
def test_encode_speed(name):
    tok = vocab_tokenizer(name)
    para = (
        "The quick brown fox jumps over the lazy dog. 我想在apple工作1314151天～ "
        "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n"
        "Emoji: 🦙🚀😶‍🌫️ ✅  Numbers: 3.14159, 1,000,000 and 2024-05-01.\t\tTabs   and   spaces\n"
        "Привет, мир! Γειά σου Κόσμε. नमस्ते दुनिया. 안녕하세요 세계. "
    )
    text = (para * 40).encode()[:10_000].decode(errors="ignore")  # 10 kB of mixed text
    tok.encode(text)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        ids = tok.encode(text, add_special=False)
        best = min(best, time.perf_counter() - t0)
    print(f"{name}: {len(ids)} tokens from 10 kB in {best * 1e3:.1f} ms = {len(ids) / best:,.0f} tokens/s")
    assert len(ids) / best > 50_000
