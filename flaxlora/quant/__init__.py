"""QLoRA: frozen weights stored quantized (NF4, int8, or a GGUF file's own blocks), adapters in fp32.

    frozen = flaxlora.quantize(params, "nf4", targets=r"(query|key|value|dense)/kernel$")
    with flaxlora.quant.quantized_dense():   # Dense layers compute x @ deq(W), one weight at a time
        logits = model.apply({"params": frozen}, ...)

Training (``experiments/qqp.py --quantize nf4``) quantizes tensor by tensor while loading and runs
the factored LoRA path on top (:func:`flaxlora.training.logits_fn`).
"""

from flaxlora.quant.arrays import (
    NF4_CODEBOOK,
    SCHEMES,
    QuantizedArray,
    dequantize_weight,
    from_gguf_blocks,
    is_quantized,
    quantize_weight,
)
from flaxlora.quant.dense import quantized_dense, quantized_matmul
from flaxlora.quant.tree import dequantize, quantize

__all__ = ["NF4_CODEBOOK", "SCHEMES", "QuantizedArray", "dequantize", "dequantize_weight", "from_gguf_blocks",
           "is_quantized", "quantize", "quantize_weight", "quantized_dense", "quantized_matmul"]
