"""nextn: a local LLM server with multi-token-prediction speculative decoding on OpenCL."""

__version__ = "0.1.0"
