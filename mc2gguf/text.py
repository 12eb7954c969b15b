"""Text -> tokens, for calibration (PMQ, ODP thresholds, the reference-MoE builder) and evaluation.

Files are plain text (documents separated by blank lines or ``<|endoftext|>``) or JSONL with a ``"text"``
field; several files mix domains. Every document is tokenized with the model's tokenizer (BOS first, or
followed by a separator token) and the documents are concatenated into one stream, from which ``nsamples``
windows of ``seqlen`` tokens start at seeded random positions (as GPTQ's C4 loader does). With no file, the
model samples its own text.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import Mc2ggufError

_DOC_SEPARATOR = re.compile(r"<\|endoftext\|>|\n\s*\n")


@dataclass(frozen=True)
class CalibrationSet:
    tokens: torch.Tensor  # [nsamples, seqlen] int64
    source: str  # provenance, written into the GGUF metadata and the report
    seed: int

    @property
    def n_tokens(self) -> int:
        return self.tokens.numel()


def documents(path: Path) -> list[str]:
    if not path.is_file():
        raise Mc2ggufError(f"calibration file {path} not found")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise Mc2ggufError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise Mc2ggufError(f'{path}:{n}: JSONL records need a string "text" field')
            docs.append(record["text"])
    else:
        docs = _DOC_SEPARATOR.split(text)
    docs = [d.strip() for d in docs if d.strip()]
    if not docs:
        raise Mc2ggufError(f"calibration file {path} holds no text")
    return docs


def load_tokenizer(model_dir: Path):
    """The Hugging Face tokenizer of a model directory."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise Mc2ggufError(f"cannot load the tokenizer of {model_dir}: {e}") from None


def token_stream(tokenizer, files: list[Path], separator: int | None = None) -> torch.Tensor:
    """Every document of ``files`` tokenized and joined: with the tokenizer's special tokens (BOS first), or,
    with ``separator``, without them and that token after each document."""
    stream: list[int] = []
    for path in files:
        for doc in documents(Path(path)):
            stream.extend(tokenizer(doc, add_special_tokens=separator is None)["input_ids"])
            if separator is not None:
                stream.append(separator)
    return torch.tensor(stream, dtype=torch.int64)


def sample_windows(stream: torch.Tensor, nsamples: int, seqlen: int, seed: int, what: str,
                   overlap: bool = True) -> torch.Tensor:
    """``[nsamples, seqlen]`` windows of ``stream`` at seeded random starts; where the stream holds fewer than
    ``nsamples * seqlen`` tokens they overlap (with a warning), or, with ``overlap=False``, it is an error."""
    if stream.numel() < seqlen:
        raise Mc2ggufError(f"{what} is too short: {stream.numel()} tokens, need at least --seqlen {seqlen}")
    if stream.numel() < nsamples * seqlen:
        if not overlap:
            raise Mc2ggufError(f"{what} holds {stream.numel()} tokens, fewer than the {nsamples * seqlen} asked for")
        print(f"warning: {what} has {stream.numel()} tokens, fewer than {nsamples} x {seqlen}: windows overlap",
              file=sys.stderr)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seqlen + 1, (nsamples,), generator=generator)
    return torch.stack([stream[s : s + seqlen] for s in starts.tolist()])


def load_calibration(model_dir: Path, files: list[Path], nsamples: int, seqlen: int, seed: int) -> CalibrationSet:
    if nsamples < 1 or seqlen < 2:
        raise Mc2ggufError("--nsamples must be >= 1 and --seqlen >= 2")
    files = [Path(f) for f in files]
    stream = token_stream(load_tokenizer(model_dir), files)
    digests = [f"{path.name} (sha256 {hashlib.sha256(path.read_bytes()).hexdigest()[:16]})" for path in files]
    tokens = sample_windows(stream, nsamples, seqlen, seed, "the calibration text")
    return CalibrationSet(tokens, "files: " + ", ".join(digests), seed)


def self_sampled_calibration(model_dir: Path, nsamples: int, seqlen: int, seed: int) -> CalibrationSet:
    """Text the full-precision model samples itself (from BOS, temperature 1): needs no data, but the model
    must fit in memory, and it calibrates on the model's own distribution rather than on real text."""
    from transformers import AutoModelForCausalLM

    weights = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if 4 * weights > available:  # float32 copy of (at most) bf16 weights, plus room to run
        raise Mc2ggufError(
            f"no --calib text given, and the model ({weights / 2**30:.1f} GiB) is too large to sample "
            "calibration text from on this machine: pass --calib FILE"
        )
    print(f"note: no --calib given: calibrating on {nsamples} x {seqlen} tokens the model samples itself",
          file=sys.stderr)
    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0
    with torch.no_grad():
        out = model.generate(
            torch.full((nsamples, 1), bos, dtype=torch.int64), do_sample=True, temperature=1.0, top_k=0,
            max_new_tokens=seqlen - 1, min_new_tokens=seqlen - 1, pad_token_id=bos,
        )
    return CalibrationSet(out[:, :seqlen].contiguous(), "self-sampled by the model (no --calib)", seed)
