"""Quantization: the type table (``types``), the scalar-grid quantizers (``grid``, ``kquants``, ``legacy``,
``ternary``), ggml's codebook quantizer through its C API (``ggml_lib``), whole-tensor quantize/dequantize for
every type (``codec``), GPTQ onto a type's grid (``gptq``), and one type per tensor (``plan``).

Nothing is imported here, so ``mc2gguf.quant.types`` (read by the command line) stays light."""
