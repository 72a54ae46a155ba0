"""llama: Llama-family dense models. No q/k norm; RoPE rotates adjacent pairs (GGML's NORM mode), because
llama.cpp's converter permutes the q/k weights of LlamaForCausalLM for it."""

from nextn.models import dense
from nextn.models.dense import DenseHParams

FAMILY = dense  # hparams, tensors, memory and the step

ROPE_NEOX = False
QK_NORM = False


def hparams(mf) -> DenseHParams:
    return DenseHParams.from_file(mf, rope_neox=ROPE_NEOX, qk_norm=QK_NORM)
