"""Perplexity exactly as llama.cpp's ``llama-perplexity`` defines it.

Perplexity (the definition of llama.cpp's ``tools/perplexity/perplexity.cpp``, default mode, pinned version):

- the text file is read whole and one trailing newline is dropped (``-f`` does that); it is tokenized in one
  piece, with BOS in front when the vocabulary adds one (``common_tokenize(..., add_special=true)``);
- at least ``2 * n_ctx`` tokens are required; ``n_chunk = min(--chunks, len(tokens) // n_ctx)``;
- chunk ``i`` is ``tokens[i*n_ctx : (i+1)*n_ctx]``, evaluated from an empty cache, its first token replaced by
  BOS when the vocabulary adds BOS;
- only the second half is scored: with ``first = n_ctx // 2`` the logits at positions ``first .. n_ctx-2``
  predict the (original) tokens ``first+1 .. n_ctx-1``: ``n_ctx - first - 1`` tokens per chunk;
- ``PPL = exp(mean NLL)``; its standard error ``PPL * sqrt((mean(NLL^2) - mean(NLL)^2) / (count - 1))``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import Mc2ggufError


def read_eval_text(path: Path) -> str:
    """The file as llama-perplexity's ``-f`` reads it: raw bytes (UTF-8), one trailing newline dropped."""
    path = Path(path)
    if not path.is_file():
        raise Mc2ggufError(f"evaluation text {path} not found")
    text = path.read_bytes().decode("utf-8", errors="replace")
    return text[:-1] if text.endswith("\n") else text


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of a text (what ``add_bos_token`` means to llama.cpp)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(with_special) > len(without) and with_special[0] == bos


def tokenize_text(tokenizer, text: str, add_bos: bool, bos_id: int | None) -> list[int]:
    """``text`` in one piece, BOS first when ``add_bos`` (never EOS: llama-perplexity refuses add_eos)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if add_bos:
        if bos_id is None:
            raise Mc2ggufError("the vocabulary adds BOS but has no BOS token id")
        ids.insert(0, int(bos_id))
    return ids


def llama_tokenize(gguf_path: Path, text: str) -> tuple[list[int], bool]:
    """``text`` tokenized by the pinned llama.cpp with ``gguf_path``'s vocabulary exactly as llama-perplexity
    does (``add_special`` true, ``parse_special`` false); returns the tokens and whether BOS was added."""
    from ..llama.runtime import bindings

    llama_cpp = bindings()
    llm = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    try:
        tokens = [int(t) for t in llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)]
        add_bos = bool(tokens) and tokens[0] == int(llm.token_bos())
    finally:
        llm.close()
    return tokens, add_bos


@dataclass(frozen=True)
class Windows:
    """llama-perplexity's chunks: ``inputs`` ``[n_chunk, n_ctx]`` (first token BOS when ``add_bos``), the
    original tokens ``targets`` ``[n_chunk, n_ctx]``, and the first scored logit position ``first``."""

    inputs: torch.Tensor
    targets: torch.Tensor
    first: int

    @property
    def n_chunk(self) -> int:
        return self.inputs.shape[0]

    @property
    def n_ctx(self) -> int:
        return self.inputs.shape[1]

    @property
    def scored_per_chunk(self) -> int:
        return self.n_ctx - self.first - 1

    def score_positions(self) -> range:
        """Logit positions that are scored; position ``p`` predicts ``targets[:, p + 1]``."""
        return range(self.first, self.n_ctx - 1)


def perplexity_windows(tokens: Sequence[int] | torch.Tensor, n_ctx: int, n_chunks: int | None = None,
                       add_bos: bool = False, bos_id: int | None = None, what: str = "the text") -> Windows:
    """Split ``tokens`` as llama-perplexity does (see the module docstring)."""
    if n_ctx < 4:
        raise Mc2ggufError(f"--ctx must be at least 4, got {n_ctx}")
    tokens = torch.as_tensor(list(tokens) if not isinstance(tokens, torch.Tensor) else tokens, dtype=torch.int64)
    if tokens.numel() < 2 * n_ctx:
        raise Mc2ggufError(
            f"{what} tokenizes to only {tokens.numel()} tokens; a perplexity with --ctx {n_ctx} needs at least "
            f"2 x {n_ctx} = {2 * n_ctx} (as llama-perplexity): use a longer text or a smaller --ctx"
        )
    n_chunk_max = tokens.numel() // n_ctx
    if n_chunks is not None and n_chunks < 1:
        raise Mc2ggufError(f"--chunks must be at least 1, got {n_chunks}")
    n_chunk = n_chunk_max if n_chunks is None else min(n_chunks, n_chunk_max)
    targets = tokens[: n_chunk * n_ctx].view(n_chunk, n_ctx).clone()
    inputs = targets.clone()
    if add_bos:
        if bos_id is None:
            raise Mc2ggufError("add_bos needs a BOS token id")
        inputs[:, 0] = int(bos_id)
    return Windows(inputs, targets, n_ctx // 2)


@dataclass
class PerplexityAccumulator:
    """Running NLL sums, exactly llama-perplexity's ``nll``, ``nll2`` and ``count``."""

    nll: float = 0.0
    nll2: float = 0.0
    count: int = 0
    chunk_ppl: list[float] = field(default_factory=list)

    def add_chunk(self, logits: torch.Tensor, targets: torch.Tensor, first: int) -> None:
        """``logits`` ``[n_ctx, V]`` of one chunk, ``targets`` its original tokens ``[n_ctx]``."""
        n_ctx = targets.shape[0]
        lp = torch.log_softmax(logits[first : n_ctx - 1].double(), dim=-1)
        v = -lp.gather(1, targets[first + 1 : n_ctx, None].to(lp.device)).squeeze(1)
        self.nll += float(v.sum())
        self.nll2 += float((v * v).sum())
        self.count += n_ctx - first - 1
        self.chunk_ppl.append(self.ppl)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.count)

    @property
    def stderr(self) -> float:
        """llama-perplexity's "+/-": ``PPL * sqrt(var(NLL) / (count - 1))`` (NaN if not computable)."""
        if self.count < 2:
            return math.nan
        mean = self.nll / self.count
        var = self.nll2 / self.count - mean * mean
        return self.ppl * math.sqrt(var / (self.count - 1)) if var > 0 else math.nan


def interpolate_at(points: Iterable[tuple[float, float]], x: float) -> float | None:
    """Piecewise-linear ``y(x)`` through ``(x, y)`` points (sorted by x); ``None`` outside their range."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    if len(pts) == 1 and pts[0][0] == x:
        return pts[0][1]
    return None
