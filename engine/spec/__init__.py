"""Speculative decoding: drafters (n-gram, MTP, draft model), verification and adaptive draft length."""
