"""PMQ's options, and which of them each stage depends on (so a work directory is reused only where valid)."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import __version__
from ..checkpoint import Checkpoint
from ..quant.types import DEFAULT_PALETTE
from .allocate import Objective

#: The options the measurement (calibration, significance, eps) depends on; allocation and writing read the rest.
MEASURE_OPTIONS = ("calib", "nsamples", "seqlen", "seed", "palette", "granularity", "tie_gate_up", "eps_method",
                   "eps_tokens", "damp", "act_order")


@dataclass(frozen=True)
class PMQOptions:
    calib: tuple[Path, ...] = ()
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    bpw: float | None = None
    size: int | None = None
    palette: tuple[str, ...] = DEFAULT_PALETTE
    objective: Objective = field(default_factory=Objective)
    per_layer_budget: bool = False
    granularity: str = "expert"
    tie_gate_up: bool = True
    layout: str = "mixed"
    attn_type: str = "Q4_K"
    eps_method: str = "gptq"
    eps_tokens: int = 4096
    sequential: bool = False
    act_order: bool = False
    damp: float = 0.01
    protect_ratio: float = 0.02
    #: --min-speed: the experts' predicted decode speed relative to all-speed_reference experts, by type_costs
    #: ((type name, seconds per expert weight) pairs, measured by mc2gguf type-costs)
    min_speed: float | None = None
    speed_reference: str = "Q4_K"
    type_costs: tuple[tuple[str, float], ...] = ()

    def fingerprint(self, checkpoint: Checkpoint, options: tuple[str, ...] | None = None) -> dict:
        """Everything the output depends on (or, given ``options``, a stage that reads only those): options,
        input files' identity, mc2gguf version."""
        files = sorted(p for p in checkpoint.path.iterdir() if p.is_file())
        calib = [str(Path(p).resolve()) for p in self.calib]
        values = {**asdict(self), "calib": calib}
        return {
            "mc2gguf": __version__,
            "options": {k: values[k] for k in options} if options else values,
            "model": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files},
            "calib": {c: hashlib.sha256(Path(c).read_bytes()).hexdigest() for c in calib},
        }
