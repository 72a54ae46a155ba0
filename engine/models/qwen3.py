"""qwen3: Qwen3 dense models (also small ones as draft models). Per-head q/k RMSNorm, NeoX RoPE, tied output
on the small sizes. Tensor names as llama.cpp's convert_hf_to_gguf.py writes Qwen3ForCausalLM."""

from nextn.models import dense
from nextn.models.dense import DenseHParams

FAMILY = dense  # hparams, tensors, memory and the step

ROPE_NEOX = True
QK_NORM = True


def hparams(mf) -> DenseHParams:
    return DenseHParams.from_file(mf, rope_neox=ROPE_NEOX, qk_norm=QK_NORM)
