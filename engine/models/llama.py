"""llama: Llama-family dense models. No q/k norm; RoPE rotates adjacent pairs (GGML's NORM mode), because
llama.cpp's converter permutes the q/k weights of LlamaForCausalLM for it."""

from nextn.models.dense import Dense

ARCH = Dense("llama", rope_neox=False, qk_norm=False)
