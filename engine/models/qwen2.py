"""qwen2: Qwen2 and Qwen2.5 dense models (the common small draft models, the DeepSeek-R1 distills). q/k/v biases,
NeoX RoPE, no q/k norm; tied output on the small sizes. Tensor names as llama.cpp's convert_hf_to_gguf.py writes
Qwen2ForCausalLM; math as llama.cpp's src/models/qwen2.cpp."""

from nextn.models.dense import Dense

ARCH = Dense("qwen2", rope_neox=True, qk_norm=False)
