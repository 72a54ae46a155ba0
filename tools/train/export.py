"""Writes the trained model as a GGUF file in llama.cpp's qwen35 layout, through make-tiny's writer
(engine/devtools/tiny.py): the same tensor table the loader reads (engine/models/qwen35.py), the metadata
keys llama.cpp's converter writes for Qwen3.5 (block_count counting the MTP block, nextn_predict_layers,
attention.recurrent_layers, full_attention_interval, M-RoPE sections, ssm.*), the tokenizer of vocab.py."""

import gguf
from corpus import python_version
from model import Qwen35
from vocab import write_vocab

from nextn.devtools.tiny import make_tiny

NAME = "nextn-stdlib-qwen35-mtp"


def export(model: Qwen35, tok, path, qtype: str = "F16", description: str = "") -> None:
    s = model.s
    weights = {k: v.detach().float().numpy() for k, v in model.named_gguf().items()}

    def meta(w: gguf.GGUFWriter) -> int:
        n_vocab = write_vocab(w, tok)
        w.add_description(description or f"A small qwen35 code model with its MTP block, trained by nextn "
                          f"(tools/train) on the {python_version()} standard library")
        w.add_license("MIT (weights); corpus: the Python standard library, PSF License Agreement")
        w.add_string("general.source.url", "https://docs.python.org/3/license.html")
        return n_vocab

    make_tiny(
        path, arch="qwen35", qtype=qtype, n_embd=s.n_embd, n_layer=s.n_layer, n_head=s.n_head,
        n_head_kv=s.n_head_kv, head_dim=s.head_dim, n_ff=s.n_ff, n_ctx=s.n_ctx, vocab=meta, tied=False,
        rope_freq_base=s.rope_base, mtp=model.mtp, full_attention_interval=s.full_attention_interval,
        n_rot=s.n_rot, ssm_d_conv=s.d_conv, ssm_d_state=s.head_k_dim, ssm_n_group=s.n_k_heads,
        ssm_dt_rank=s.n_v_heads, weights=weights, name=NAME,
    )
