"""Vocabularies for the tokenizer and chat template tests, each loaded once per test session.

gguf-py needs ~6 s to open a 150k-token vocabulary on the 2-core test machine, so the files are read
through a cache shared by every test module that imports this one.
"""

import functools
import json
from pathlib import Path

from nextn.gguf.metadata import read_metadata
from nextn.tokenizer import BYTE_TO_UNICODE, Tokenizer

DATA = Path(__file__).parent / "data"
VOCAB_DIR = DATA / "vocab"
TEMPLATE_DIR = DATA / "chat_templates"


def vocab_path(name: str) -> Path:
    return VOCAB_DIR / f"ggml-vocab-{name}.gguf"


@functools.cache
def vocab_meta(name: str) -> dict:
    return read_metadata(str(vocab_path(name)))


@functools.cache
def vocab_tokenizer(name: str) -> Tokenizer:
    return Tokenizer.from_metadata(vocab_meta(name))


def read_vectors(name: str) -> dict[str, list[int]]:
    """The .inp/.out test vectors, read as llama.cpp's tests/test-tokenizer-0.cpp reads them: inputs
    separated by a marker line (a trailing marker starts no new input), one line of ids per input;
    a repeated input keeps its last ids."""
    path = vocab_path(name)
    raw = path.with_name(path.name + ".inp").read_bytes().decode("utf-8")
    lines = path.with_name(path.name + ".out").read_bytes().decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # std::getline yields no line after the final newline
    sep = "\n__ggml_vocab_test__\n"
    inputs, pos = [], 0
    while pos < len(raw):
        nxt = raw.find(sep, pos)
        if nxt < 0:
            inputs.append(raw[pos:])
            break
        inputs.append(raw[pos:nxt])
        pos = nxt + len(sep)
    assert len(inputs) == len(lines), f"{name}: {len(inputs)} inputs but {len(lines)} output lines"
    return {s: [int(t) for t in line.split()] for s, line in zip(inputs, lines)}


@functools.cache
def pre_splits() -> dict:
    """llama.cpp's pieces and flags for every pre-tokenizer name (see data/vocab/make_pre_splits.py)."""
    return json.loads((VOCAB_DIR / "pre-tokenizer-splits.json").read_text(encoding="utf-8"))


TINY_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def tiny_meta(merges: tuple[str, ...] = (), chat_template: str | None = None, **overrides) -> dict:
    """The byte-level vocabulary the project's tiny test models use: 256 single-byte tokens in GPT-2's
    byte-to-unicode form (id == byte value), one token per merge result, then three CONTROL tokens."""
    tokens = [BYTE_TO_UNICODE[b] for b in range(256)]
    for m in merges:
        a, b = m.split(" ")
        tokens.append(a + b)
    tokens += TINY_SPECIALS
    meta = {
        "general.architecture": "qwen3",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * (len(tokens) - 3) + [3, 3, 3],
        "tokenizer.ggml.bos_token_id": len(tokens) - 3,
        "tokenizer.ggml.eos_token_id": len(tokens) - 1,
        "tokenizer.ggml.add_bos_token": False,
    }
    if merges:  # gguf-py writes no key for an empty array, so a merge-less vocabulary has none
        meta["tokenizer.ggml.merges"] = list(merges)
    if chat_template is not None:
        meta["tokenizer.chat_template"] = chat_template
    meta.update(overrides)
    return meta
