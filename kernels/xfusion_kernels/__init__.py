"""Triton attention kernels for xfusion-serve, each with a plain torch reference of the same signature.

The Triton functions run on CUDA tensors, or anywhere with TRITON_INTERPRET=1 (slow; for tests). Otherwise
they raise RuntimeError and callers are expected to use the *_reference functions. Importing this package
never needs triton.
"""

from .decode import paged_decode_attention, paged_decode_attention_reference
from .prefill import prefill_attention, prefill_attention_reference

__all__ = [
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "prefill_attention",
    "prefill_attention_reference",
]
