"""Developer tools that ship with nextn: `make-tiny` (random test models of every architecture, laid out as
llama.cpp's converter writes them) and `bench` (speed against the memory-bandwidth bound, side by side).
Their data (the Qwen2 vocabulary the bench models use, from llama.cpp's test files) is package data in data/.
"""
