"""Frozen weights kept quantized: GGUF's Q4_1 and Q8_0 blocks as a file ships them, and NF4 with
double quantization as in the QLoRA paper (Dettmers et al., 2023), each dequantized on the fly.

Reference code: the formats are plain array functions, and ``quantize_weight`` below picks one by
name. The layer pair that multiplies by such a weight is ``minilora.layers.quantized_linear``, and
``minilora.weight_formats`` records which of a model's weights are held this way.

Reading order:

    weight.py       QuantizedWeight: one matrix as rows of blocks, dequantized a slab of rows at a time
    gguf_blocks.py  GGUF's Q4_1 and Q8_0 blocks, read as the file stores them, dequantized as llama.cpp does
    nf4.py          NF4's codebook of normal quantiles, with double quantization of the block constants
"""

from .gguf_blocks import quantize_gguf_blocks, quantized_from_gguf
from .nf4 import NF4_CODEBOOK, quantize_nf4
from .weight import QuantizedWeight

QUANTIZED_FORMATS = ("gguf", "q4_1", "q8_0", "nf4")  # a GGUF file's own blocks, or one format for all


def quantize_weight(weight, format: str, layout: str = "linear") -> QuantizedWeight:
    """A stored (rows, cols) float matrix quantized to ``format``: "q4_1", "q8_0" or "nf4"."""
    if format == "nf4":
        return quantize_nf4(weight, layout)
    return quantize_gguf_blocks(weight, format, layout)


__all__ = [
    "NF4_CODEBOOK",
    "QUANTIZED_FORMATS",
    "QuantizedWeight",
    "quantize_gguf_blocks",
    "quantize_nf4",
    "quantize_weight",
    "quantized_from_gguf",
]
