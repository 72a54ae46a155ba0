"""A byte-level BPE vocabulary learned with the `tokenizers` library, pre-tokenized as llama.cpp's "qwen2"
pre-tokenizer (tokenizer.ggml.pre = "qwen2") splits, so that llama.cpp and nextn tokenize text identically to
the tokenizer it was trained with: ids 0..255 are the 256 bytes (GPT-2's byte -> character table), then the
merges in the order they were learned, then the special token <|endoftext|> (end of a file; EOS and BOS)."""

import json

import gguf
from corpus import EOT
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from nextn.tokenizer import _PRE_REGEXES

PRE = "qwen2"


def pre_tokenizer():
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _PRE_REGEXES[PRE]]
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def train_vocab(texts, n_vocab: int) -> Tokenizer:
    """n_vocab tokens in all: 256 bytes, n_vocab - 257 merges, <|endoftext|>."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=n_vocab - 1, initial_alphabet=alphabet, min_frequency=2,
                                  show_progress=False, special_tokens=[])
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([EOT])
    return tok


def tokens_and_merges(tok: Tokenizer) -> tuple[list[str], list[str]]:
    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    tokens.append(EOT)
    assert tok.token_to_id(EOT) == len(tokens) - 1 and None not in tokens
    return tokens, merges


def write_vocab(w: gguf.GGUFWriter, tok: Tokenizer) -> int:
    """The tokenizer.* keys as llama.cpp's converter writes a GPT-2-style BPE vocabulary; returns n_vocab."""
    tokens, merges = tokens_and_merges(tok)
    types = [gguf.TokenType.NORMAL] * (len(tokens) - 1) + [gguf.TokenType.CONTROL]
    eot = len(tokens) - 1
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(PRE)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(eot)
    w.add_bos_token_id(eot)
    w.add_pad_token_id(eot)
    w.add_add_bos_token(False)
    return len(tokens)
