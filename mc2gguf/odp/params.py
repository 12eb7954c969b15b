"""ODP's parameters as a file carries them: per-layer ``mu`` and decode-proxy ``protect_norm``, and the
protected fraction they were calibrated for. The same form in GGUF metadata (``mc2gguf.odp.*``) and in the
JSON of ``mc2gguf eval --save-odp/--odp-params``."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import Mc2ggufError
from ..gguf.keys import Keys

_F32_MAX = 3.4028234663852886e38  # GGUF stores the thresholds as float32


@dataclass
class OdpParams:
    """Per-layer ``mu`` and decode-proxy ``protect_norm``, and the protected fraction: the converter's form
    (GGUF keys ``mc2gguf.odp.mu``, ``mc2gguf.odp.protect_norm``, ``mc2gguf.odp.protect_ratio``)."""

    mu: list[float]
    protect_norm: list[float]
    protect_ratio: float
    source: str = ""

    def check(self, n_layers: int) -> None:
        if len(self.mu) != n_layers or len(self.protect_norm) != n_layers:
            raise Mc2ggufError(f"ODP parameters ({self.source}) have {len(self.mu)} mu and {len(self.protect_norm)} "
                               f"protect_norm values for a model of {n_layers} layers")
        bad = [m for m in self.mu if not (math.isfinite(m) and m >= 0.0)]
        if bad or not 0.0 <= self.protect_ratio <= 1.0:
            raise Mc2ggufError(f"ODP parameters ({self.source}): mu must be finite and >= 0, protect_ratio in [0, 1]")

    def to_json(self) -> dict:
        return {"mu": [float(m) for m in self.mu], "protect_norm": [float(t) for t in self.protect_norm],
                "protect_ratio": float(self.protect_ratio), "source": self.source}

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> OdpParams:
        path = Path(path)
        if not path.is_file():
            raise Mc2ggufError(f"ODP parameter file {path} not found")
        try:
            d = json.loads(path.read_text())
            return cls([float(m) for m in d["mu"]], [float(t) for t in d["protect_norm"]],
                       float(d["protect_ratio"]), str(d.get("source") or path))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise Mc2ggufError(f"{path}: not an ODP parameter file (JSON with mu, protect_norm, protect_ratio): {e}") \
                from None

    @classmethod
    def from_gguf(cls, reader, path: Path) -> OdpParams | None:
        fields = reader.fields
        keys = (Keys.ODP_MU, Keys.ODP_PROTECT_NORM, Keys.ODP_PROTECT_RATIO)
        if not all(k in fields for k in keys):
            return None
        return cls([float(v) for v in fields[keys[0]].contents()], [float(v) for v in fields[keys[1]].contents()],
                   float(fields[keys[2]].contents()), f"GGUF metadata of {Path(path).name}")


def finite_threshold(tau: float) -> float:
    """GGUF wants finite thresholds >= 0: "+inf" (protect nobody) becomes the fp32 maximum, "-inf" 0."""
    return _F32_MAX if tau == math.inf else (0.0 if tau == -math.inf else tau)
