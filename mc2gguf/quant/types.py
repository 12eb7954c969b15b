"""The one table of GGUF tensor types mc2gguf writes.

Block size and bytes per block come from gguf-py (``GGML_QUANT_SIZES``), never restated here; this table
adds what gguf-py does not know: which quantizer packs the type and which llama.cpp backends run it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from ..errors import Mc2ggufError


class Packer(Enum):
    FLOAT = "float"  # plain element types: F32, F16, BF16
    GRID = "grid"  # scalar grids, quantized by mc2gguf's own torch code (GPTQ rounds onto these)
    CODEBOOK = "codebook"  # lattice/codebook types, quantized by ggml's own C quantizer


@dataclass(frozen=True)
class QuantType:
    name: str
    packer: Packer
    cuda: bool  # the CUDA backend runs matrix multiplications in this type
    cuda_mmq: bool  # ... and has an MMQ (quantized matmul) kernel for batched prompts
    needs_importance: bool = False  # ggml refuses to quantize it without an importance matrix

    @property
    def ggml_type(self) -> GGMLQuantizationType:
        return GGMLQuantizationType[self.name]

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[self.ggml_type][0]

    @property
    def type_size(self) -> int:
        return GGML_QUANT_SIZES[self.ggml_type][1]

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def row_bytes(self, row_length: int) -> int:
        return row_length // self.block_size * self.type_size

    def fits(self, row_length: int) -> bool:
        return row_length % self.block_size == 0

    @property
    def file_type(self) -> LlamaFileType:
        """``general.file_type`` of a file mostly in this type (K-quants: the all-one-type ``_S`` mix)."""
        if self.name == "F32":
            return LlamaFileType.ALL_F32
        return LlamaFileType.__members__.get(f"MOSTLY_{self.name}") or LlamaFileType[f"MOSTLY_{self.name}_S"]


_TYPES = (
    QuantType("F32", Packer.FLOAT, cuda=True, cuda_mmq=False),
    QuantType("F16", Packer.FLOAT, cuda=True, cuda_mmq=False),
    QuantType("BF16", Packer.FLOAT, cuda=True, cuda_mmq=False),
    QuantType("Q8_0", Packer.GRID, cuda=True, cuda_mmq=True),
    QuantType("Q5_1", Packer.GRID, cuda=True, cuda_mmq=True),
    QuantType("Q5_0", Packer.GRID, cuda=True, cuda_mmq=True),
    QuantType("Q4_1", Packer.GRID, cuda=True, cuda_mmq=True),
    QuantType("Q4_0", Packer.GRID, cuda=True, cuda_mmq=True),
    QuantType("Q6_K", Packer.GRID, cuda=True, cuda_mmq=True),
    QuantType("Q5_K", Packer.GRID, cuda=True, cuda_mmq=True),
    QuantType("Q4_K", Packer.GRID, cuda=True, cuda_mmq=True),
    QuantType("Q3_K", Packer.GRID, cuda=True, cuda_mmq=True),
    QuantType("Q2_K", Packer.GRID, cuda=True, cuda_mmq=True),
    QuantType("TQ2_0", Packer.GRID, cuda=False, cuda_mmq=False),
    QuantType("TQ1_0", Packer.GRID, cuda=False, cuda_mmq=False),
    QuantType("IQ4_XS", Packer.CODEBOOK, cuda=True, cuda_mmq=True),
    QuantType("IQ3_S", Packer.CODEBOOK, cuda=True, cuda_mmq=True),
    QuantType("IQ3_XXS", Packer.CODEBOOK, cuda=True, cuda_mmq=True),
    QuantType("IQ2_S", Packer.CODEBOOK, cuda=True, cuda_mmq=True),
    QuantType("IQ2_XS", Packer.CODEBOOK, cuda=True, cuda_mmq=True, needs_importance=True),
    QuantType("IQ2_XXS", Packer.CODEBOOK, cuda=True, cuda_mmq=True, needs_importance=True),
    QuantType("IQ1_M", Packer.CODEBOOK, cuda=True, cuda_mmq=False, needs_importance=True),
    QuantType("IQ1_S", Packer.CODEBOOK, cuda=True, cuda_mmq=True, needs_importance=True),
)

QUANT_TYPES: dict[str, QuantType] = {t.name: t for t in _TYPES}

# PMQ's default candidates for experts: a ladder of mainline types from ~1.6 to 4.5 bits per weight, all run
# by llama.cpp's CUDA backend (so no TQ1_0/TQ2_0: edge GPUs are the target). Under GPTQ, which corrects
# K-quants column by column but codebook types only block by block, Q2_K, Q3_K and Q4_K have 16 %, 11 % and
# 45 % less eps than IQ2_S, IQ3_S and IQ4_XS at the same or nearly the same size (medians over the 16 experts
# of layers 0 and 15 of the reference MoE, benchmarks/eps_by_type.py), so those three are left out. So is
# IQ2_XS: its median eps lies 4 % above the line between IQ2_XXS's and Q2_K's (the integer program mixes those
# two instead), and it was the old palette's slowest type to quantize. IQ3_XXS lies as far above the line
# between Q2_K and Q3_K, and stays: quicker to quantize than IQ2_XS, it is the only type between 2.6 and 3.4
# bits.
DEFAULT_PALETTE = ("IQ1_S", "IQ1_M", "IQ2_XXS", "Q2_K", "IQ3_XXS", "Q3_K", "Q4_K")


def quant_type(name: str) -> QuantType:
    try:
        return QUANT_TYPES[name.upper()]
    except KeyError:
        raise Mc2ggufError(f"unknown type {name!r}; supported: {', '.join(QUANT_TYPES)}") from None


def by_ggml_type(ggml_type: GGMLQuantizationType) -> QuantType | None:
    return QUANT_TYPES.get(ggml_type.name)


def fallback_type(qtype: QuantType, row_length: int) -> QuantType:
    """The type to use when ``qtype``'s blocks do not divide ``row_length``.

    The nearest type that fits: the smallest type that fits and has at least as many bits per weight (so
    quality never drops below what was asked), else the largest that fits.
    """
    if qtype.fits(row_length):
        return qtype
    fitting = [t for t in _TYPES if (t.fits(row_length) and t.packer is not Packer.FLOAT) or t.name == "F16"]
    at_least = [t for t in fitting if t.bits_per_weight >= qtype.bits_per_weight]
    if at_least:
        return min(at_least, key=lambda t: t.bits_per_weight)
    return max(fitting, key=lambda t: t.bits_per_weight)
