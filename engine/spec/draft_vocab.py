"""A reduced draft vocabulary for the MTP head, as FR-Spec drafts (`--spec-draft-vocab N`).

The MTP head's output projection over the whole vocabulary is most of a draft's cost on a model with a large
vocabulary (for 152k tokens, about half of a small model's bytes). With N > 0 the head drafts over the N most
frequent tokens only: a reduced copy of its output matrix (those rows, in id order) and an argmax over them.
The trunk still verifies with its full head, so output is unchanged; a token outside the N is never drafted,
which costs acceptance only where the model would have written a rare token.

Frequencies: the model's own tokenizer over a text sample every machine has offline, the Python standard
library's documentation (pydoc_data/topics.py: English prose) and source (code). Tokens the sample never uses
follow by id (a BPE vocabulary's merge order, itself a frequency order). End-of-generation tokens are always
kept, so a draft can end a reply.
"""

import sysconfig
from pathlib import Path

import numpy as np

SAMPLE_CHARS = 800_000  # of each kind: ~0.5 s of tokenization


def sample_text() -> str:
    """English documentation, then Python source, from the standard library (a fixed choice per version)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    docs = root / "pydoc_data" / "topics.py"
    if docs.is_file():
        parts.append(docs.read_text(encoding="utf-8", errors="replace")[:SAMPLE_CHARS])
    code, size = [], 0
    for path in sorted(root.glob("*.py")):
        if size >= SAMPLE_CHARS:
            break
        text = path.read_text(encoding="utf-8", errors="replace")
        code.append(text)
        size += len(text)
    parts.append("".join(code)[:SAMPLE_CHARS])
    return "\n".join(parts)


def draft_vocab_ids(tokenizer, n_vocab: int, n: int, text: str | None = None) -> np.ndarray:
    """The n token ids the reduced head keeps, ascending (int32): end-of-generation tokens, then the most
    frequent in `text` (default: sample_text()), then by id."""
    if not 0 < n < n_vocab:
        raise ValueError(f"draft vocabulary of {n} tokens: must be between 1 and {n_vocab - 1}")
    ids = np.asarray(tokenizer.encode(sample_text() if text is None else text, add_special=False), np.int64)
    counts = np.bincount(ids[(ids >= 0) & (ids < n_vocab)], minlength=n_vocab)
    eog = sorted(i for i in tokenizer.eot_ids if 0 <= i < n_vocab)
    counts[eog] = np.iinfo(counts.dtype).max  # kept whatever the sample says
    order = np.lexsort((np.arange(n_vocab), -counts))  # most frequent first, ties by id
    return np.sort(order[:n]).astype(np.int32)
