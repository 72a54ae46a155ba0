"""qwen3: Qwen3 dense models (also small ones as draft models). Per-head q/k RMSNorm, NeoX RoPE, tied output
on the small sizes. Tensor names as llama.cpp's convert_hf_to_gguf.py writes Qwen3ForCausalLM."""

from nextn.models.dense import Dense

ARCH = Dense("qwen3", rope_neox=True, qk_norm=True)
