"""Model metadata and vocabulary exactly as llama.cpp's own converter (pinned version) writes them.

Rather than re-deriving tokenizer handling, mc2gguf runs the pinned ``convert_hf_to_gguf.py --vocab-only``
in a subprocess (with the gguf-py it ships) and copies every key/value it wrote.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from .errors import Mc2ggufError
from .gguf_out import KeyValue, read_metadata
from .llama_build import llama_source


def upstream_converter() -> Path:
    return llama_source() / "convert_hf_to_gguf.py"


def upstream_metadata(model_dir: Path) -> list[KeyValue]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "vocab.gguf"
        cmd = [sys.executable, str(upstream_converter()), str(model_dir), "--vocab-only", "--outfile", str(out)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0 or not out.exists():
            tail = "\n".join(proc.stdout.splitlines()[-15:])
            raise Mc2ggufError(f"llama.cpp's converter could not read the metadata/vocabulary of {model_dir}:\n{tail}")
        return read_metadata(out)
