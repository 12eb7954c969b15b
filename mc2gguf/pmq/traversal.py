"""PMQ's layer traversal: the model run one layer at a time, each layer's record checkpointed, so an interrupted
run resumes where it stopped (as llm-compressor and GPTQModel keep the traversal apart from the algorithm).

Every record is written to a temporary name and renamed, so a kill at any moment leaves either the old
state or the new one. ``run.json`` holds the fingerprint of everything the result depends on (inputs,
options, mc2gguf version); a directory left by a different run is refused rather than mixed in, or, where
asked, emptied and started again.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..archs import ArchAdapter
from ..errors import Mc2ggufError


class WorkDir:
    def __init__(self, path: Path, fingerprint: dict[str, Any], replace_other: bool = False):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        run = self.path / "run.json"
        wanted = json.dumps(fingerprint, sort_keys=True, indent=1)
        if run.exists() and run.read_text() != wanted and replace_other:
            print(f"note: {self.path} held the records of another conversion; starting it again", file=sys.stderr)
            shutil.rmtree(self.path)
            self.path.mkdir(parents=True)
        elif run.exists() and run.read_text() != wanted:
            raise Mc2ggufError(
                f"work directory {self.path} holds a different conversion (other inputs or options); "
                "remove it or choose another --work-dir"
            )
        if not run.exists():
            self._atomic_write(run, wanted.encode())

    @staticmethod
    def _atomic_write(path: Path, data: bytes) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _file(self, stage: str, name: str) -> Path:
        (self.path / stage).mkdir(exist_ok=True)
        return self.path / stage / f"{name}.pt"

    def has(self, stage: str, name: str) -> bool:
        return self._file(stage, name).exists()

    def save(self, stage: str, name: str, obj: Any) -> None:
        """A record, written whole or not at all (a temporary file renamed): a full disk or a kill never leaves
        a truncated record that a resumed run would take as done."""
        path = self._file(stage, name)
        tmp = path.with_name(path.name + ".tmp")
        try:
            torch.save(obj, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise Mc2ggufError(f"cannot write {path}: {e.strerror or e}; the work done so far is kept in "
                               f"{self.path}: free space and run the same command again to resume") from None

    def load(self, stage: str, name: str) -> Any:
        return torch.load(self._file(stage, name), weights_only=False)

    def discard(self, stage: str, name: str) -> None:
        self._file(stage, name).unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def layer_pass(adapter: ArchAdapter, tokens: torch.Tensor, work: WorkDir, stage: str, step, desc: str) -> None:
    """Run ``step(layer_index, h) -> (h_next, record)`` over the layers, checkpointing each one."""
    n = adapter.moe.n_layers
    done = [i for i in range(n) if work.has(stage, f"layer-{i:03d}")]
    start = len(done)
    if start == n:  # finished before the interruption (its last hidden state is already discarded)
        return
    h = work.load(stage, f"hidden-{start - 1:03d}") if start else adapter.embed(tokens)
    with tqdm(total=n, initial=start, unit="layer", desc=desc, file=sys.stderr) as bar:
        for i in range(start, n):
            h, record = step(i, h)
            work.save(stage, f"hidden-{i:03d}", h)
            work.save(stage, f"layer-{i:03d}", record)
            del record  # not held through the next layer's step (a quantized record is a layer's bytes)
            work.discard(stage, f"hidden-{i - 1:03d}")
            bar.update()
    work.discard(stage, f"hidden-{n - 1:03d}")
