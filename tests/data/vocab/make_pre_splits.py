"""pre-tokenizer-splits.json: how llama.cpp splits sample texts for every `tokenizer.ggml.pre` name its
vocab loader maps, and the flags it sets for each name; tests/test_tokenizer.py checks nextn against it.

    python3 tests/data/vocab/make_pre_splits.py LLAMA_CPP_SOURCE LLAMA_CPP_BUILD VERSION

LLAMA_CPP_BUILD is a cmake build directory of that source with libllama built (e.g. `cmake --build B
--target llama-tokenize`), VERSION its name (b11434); a g++ is needed. The ids llama.cpp gives spell out
its pieces: the vocabulary is byte-level, every substring of a sample text is a token, and merges join
any two adjacent substrings, so each piece merges into one token (merges never cross pieces). The flags
are those the loader sets when the file does not say: add_bos, whether there is a default BOS id,
ignore_merges (a token "zzqj" that no merge reaches comes out whole) and clean_spaces (llama_detokenize
turns "a ," into "a,").
"""

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import gguf

HERE = Path(__file__).parent
# Names whose BPE is not byte-level in llama.cpp (byte_encode = false in llm_tokenizer_bpe): a byte-level
# vocabulary means nothing to them, and nextn refuses them.
NOT_BYTE_LEVEL = ["gemma4", "granite-embed-multi-311m", "mmbert", "sarvam-moe", "whitespace"]
# Each exercises some difference between llama.cpp's regex sets; short, as the vocabulary grows with
# the cube of a text's length in bytes.
TEXTS = [
    "Hello World! It's 2024, we'RE here.",
    "don't I'LL you'Ve they'D SHE'S 'tis",
    "HelloWorld ABCdef camelCaseXML iPhone",
    "ÉCOLE école ПРИВЕТмир ΣΊΣΥΦΟΣ",
    "1234567 12 123456 1,000,000 3.14",
    "٣٤٥٦ ½¾ ①②③ ١٢٣٤٥٦٧",
    "a  b   c\t\td \r\n\n e  ",
    "x\u00a0y\u3000z\u2003w \u0085v\u2028u",
    "我想在apple工作1314151天～",
    "日本語のテキスト、カタカナ。",
    "한국어 텍스트 ㄱㄴㄷ ㅏ",
    "e\u0301 n\u0303o  सत्य नमस्ते",
    "ภาษาไทย ລາວ ខ្មែរ",
    "def f(x):\n    return x**2  # sq\n",
    "for (int i=0;i<n;++i){x[i]=y/2;}",
    "<sentinel:42> IMGIMGABCDZ IMGIMGZ",
    "$+<=>^~|` @#%&*_-",
    "！？，。「テスト」『』…—“quoted”",
    "emoji 🦙🚀 😶\u200d🌫️ 👍🏽",
    "Türkiye'nin İstanbul'u I'm",
    "  leading and trailing  ",
    "path/to/file.txt\n\nhttps://x.io/a?b=c",
    "µÀÖØöøƺ \u2126\u2128\u212a Ａｂｃ",
    "ab12cd345ef6789",
    "  12  345 x",
    "\n\n\n  \n\t\n",
    "word's 'quoted' ''double''",
    "MiXeD CaSe WORDS lowerUPPERlower",
    "αβγ ΔΕΖ ключ КЛЮЧ",
    "ﬀﬁ ǅungla ǈj Ǆ",
    "𝐀𝐁𝐂 𝟏𝟐𝟑",
    "中文，标点。English, too.",
    "漢字とかなMixed한글",
    "x\x00y\x1fz\x7f",
    "a.b,c!d?e…f。g，h、i।j۔k،l",
    "' s' t 'll",
    "1 000 000 00 0",
    "\u200b zero\u200bwidth \ufeff",
    "   ",
    "3.0e-5 0x1F 2024-05-01T12:00",
    "I'M \u00c0'S \u017f's x'S",
    "a\u0301b\u0301\u0301c ka\u0301L\u0301M",
    "Q2.5 v1.0.0 A100 ×2",
    "it'sun we'llbe I'dk",
    "a          b\n          c",
    # added in Unicode 16 (unassigned to llama.cpp): a mark, a letter, a digit, punctuation, a symbol
    "a\u0897b \u1c89y'\U000116d0 x\u1b4e! \U0001fa89z",
]

HARNESS = r"""
#include "llama.h"
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>
static std::vector<llama_token> tok(const llama_vocab * v, const std::string & s) {
    std::vector<llama_token> t(s.size() + 8);
    int n = llama_tokenize(v, s.data(), s.size(), t.data(), t.size(), false, false);
    t.resize(n < 0 ? 0 : n);
    return t;
}
int main(int argc, char ** argv) {  // VOCAB TEXTS-FILE NAME...: texts as in llama.cpp's .inp files
    llama_log_set([](ggml_log_level, const char *, void *) {}, nullptr);
    llama_backend_init();
    std::string raw;
    if (FILE * f = fopen(argv[2], "rb")) {
        for (int c; (c = fgetc(f)) != EOF; ) raw += (char) c;
        fclose(f);
    }
    const std::string sep = "\n__ggml_vocab_test__\n";
    std::vector<std::string> texts;
    for (size_t pos = 0, nxt; ; pos = nxt + sep.size()) {
        nxt = raw.find(sep, pos);
        texts.push_back(raw.substr(pos, nxt == std::string::npos ? std::string::npos : nxt - pos));
        if (nxt == std::string::npos) break;
    }
    for (int a = 3; a < argc; a++) {
        llama_model_kv_override kv[2];
        std::memset(kv, 0, sizeof(kv));
        kv[0].tag = LLAMA_KV_OVERRIDE_TYPE_STR;
        std::strcpy(kv[0].key, "tokenizer.ggml.pre");
        std::strcpy(kv[0].val_str, argv[a]);
        auto mp = llama_model_default_params();
        mp.vocab_only = true;
        mp.kv_overrides = kv;
        llama_model * model = llama_model_load_from_file(argv[1], mp);
        const llama_vocab * v = llama_model_get_vocab(model);
        auto c = tok(v, "a ,");
        char buf[64];
        int n = llama_detokenize(v, c.data(), c.size(), buf, sizeof(buf), false, false);
        printf("%s %d %d %d %d\n", argv[a], (int) llama_vocab_get_add_bos(v), llama_vocab_bos(v) >= 0,
               tok(v, "zzqj").size() == 1, std::string(buf, n > 0 ? n : 0) == "a,");
        for (auto & s : texts) {
            auto t = tok(v, s);
            for (size_t i = 0; i < t.size(); i++) printf(i ? " %d" : "%d", t[i]);
            printf("\n");
        }
        llama_model_free(model);
    }
}
"""


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> character table, the alphabet of byte-level vocabularies."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in printable)})
    return table


def main(source: Path, build: Path, version: str) -> None:
    names = list(
        dict.fromkeys(re.findall(r'tokenizer_pre == "([^"]*)"', (source / "src/llama-vocab.cpp").read_text()))
    )
    alphabet = byte_alphabet()
    tokens = [alphabet[b] for b in range(256)]
    seen, merges = set(tokens), {}
    for text in TEXTS:
        s = "".join(alphabet[b] for b in text.encode())
        for n in range(2, len(s) + 1):
            for i in range(len(s) - n + 1):
                sub = s[i : i + n]
                if sub not in seen:
                    seen.add(sub)
                    tokens.append(sub)
                for k in range(1, n):
                    merges.setdefault(f"{sub[:k]} {sub[k:]}", None)
    assert not any(p in t for t in tokens for p in ("zz", "zq", "qj"))
    tokens.append("zzqj")
    with tempfile.TemporaryDirectory() as tmp:
        vocab, texts, exe = Path(tmp, "vocab.gguf"), Path(tmp, "texts"), Path(tmp, "harness")
        w = gguf.GGUFWriter(str(vocab), "gpt2")
        w.add_block_count(1)
        w.add_context_length(64)
        w.add_embedding_length(8)
        w.add_feed_forward_length(8)
        w.add_head_count(1)
        w.add_layer_norm_eps(1e-5)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types([1] * len(tokens))
        w.add_token_merges(list(merges))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        texts.write_bytes("\n__ggml_vocab_test__\n".join(TEXTS).encode())
        Path(tmp, "harness.cpp").write_text(HARNESS)
        lib = build / "bin"
        include = [f"-I{source}/include", f"-I{source}/ggml/include"]
        link = [f"-L{lib}", "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{lib}"]
        subprocess.run(
            ["g++", "-O1", "-std=c++17", str(Path(tmp, "harness.cpp")), *include, *link, "-o", str(exe)],
            check=True,
        )
        run = [n for n in names if n not in NOT_BYTE_LEVEL]
        lines = subprocess.run(
            [str(exe), str(vocab), str(texts), *run], check=True, capture_output=True
        ).stdout
    lines = lines.decode().split("\n")
    to_byte = {c: b for b, c in alphabet.items()}
    splits: list = []
    out = {}
    for k, name in enumerate(run):
        head = lines[k * (len(TEXTS) + 1)].split()
        assert head[0] == name, head
        add_bos, bos, ignore_merges, clean_spaces = (x == "1" for x in head[1:])
        pieces = [
            [bytes(to_byte[c] for c in tokens[int(i)]).decode() for i in line.split()]
            for line in lines[k * (len(TEXTS) + 1) + 1 : (k + 1) * (len(TEXTS) + 1)]
        ]
        if pieces not in splits:
            splits.append(pieces)
        out[name] = {
            "splits": splits.index(pieces), "add_bos": add_bos, "bos": bos, "ignore_merges": ignore_merges,
            "clean_spaces": clean_spaces,
        }  # fmt: skip

    # one line per text, name and list of pieces, for readable diffs
    def dump(v: object) -> str:
        return json.dumps(v, ensure_ascii=False)

    about = f"{__doc__.split(chr(10) * 2)[0]} llama.cpp {version}; written by make_pre_splits.py."
    lines = ["{", f' "about": {dump(" ".join(about.split()))},', ' "texts": [']
    lines += [f"  {dump(t)}," for t in TEXTS]
    lines[-1] = lines[-1][:-1]
    lines += [" ],", f' "not_byte_level": {dump(NOT_BYTE_LEVEL)},', ' "names": {']
    lines += [f"  {dump(n)}: {dump(v)}," for n, v in out.items()]
    lines[-1] = lines[-1][:-1]
    lines += [" },", ' "splits": [']
    for pieces in splits:
        lines += ["  ["] + [f"   {dump(p)}," for p in pieces]
        lines[-1] = lines[-1][:-1]
        lines.append("  ],")
    lines[-1] = lines[-1][:-1]
    lines += [" ]", "}"]
    (HERE / "pre-tokenizer-splits.json").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
