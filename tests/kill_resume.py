"""PMQ killed with SIGKILL at seeded random moments, then resumed: the file must be byte-identical to an
uninterrupted conversion's, every time. ``test_pmq.py`` runs two moments; the soak command runs more:

    python3 tests/kill_resume.py --points 10        # prints how many of the resumed files were identical
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def convert_argv(model: Path, out: Path, calib: Path) -> list[str]:
    return [sys.executable, "-m", "mc2gguf.cli", "convert", str(model), str(out), "--bpw", "4.5", "--calib", str(calib),
            "--nsamples", "4", "--seqlen", "64", "--eps-tokens", "128", "--palette", "Q3_K,Q4_K,Q6_K"]


def uninterrupted(model: Path, out: Path, calib: Path) -> float:
    """The reference file; returns its wall time."""
    start = time.monotonic()
    subprocess.run(convert_argv(model, out, calib), check=True, capture_output=True)
    return time.monotonic() - start


def killed_then_resumed(model: Path, out: Path, calib: Path, delay: float) -> bool:
    """Whether the run killed after ``delay`` seconds was really interrupted (False: it had finished). A run
    killed after renaming its file into place (while it writes the report or removes its work directory) has
    written it whole; otherwise it is resumed."""
    proc = subprocess.Popen(convert_argv(model, out, calib), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    if not out.exists():
        subprocess.run(convert_argv(model, out, calib), check=True, capture_output=True)
    return True


def soak(model: Path, calib: Path, work: Path, points: int, seed: int = 0) -> tuple[int, int]:
    """``(identical, interrupted)`` over ``points`` kills at seeded moments of the run."""
    reference = work / "reference.gguf"
    uninterrupted(model, work / "warm-up.gguf", calib)  # caches upstream's metadata: later runs are shorter
    duration = uninterrupted(model, reference, calib)
    rng = random.Random(seed)
    identical = interrupted = 0
    for n in range(points):
        out = work / f"resumed-{n}.gguf"
        delay = rng.uniform(0.1, 0.9) * duration
        if killed_then_resumed(model, out, calib, delay):
            interrupted += 1
            same = out.read_bytes() == reference.read_bytes()
            identical += same
            print(f"kill {n + 1}/{points} at {delay:.1f} s of {duration:.1f} s: "
                  f"{'identical' if same else 'DIFFERENT'}", flush=True)
        out.unlink(missing_ok=True)
    return identical, interrupted


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from mc2gguf.paths import C4_SAMPLE, TOKENIZER_512
    from mc2gguf.testmodel import build_tiny_mixtral

    work = Path(tempfile.mkdtemp(prefix="kill-resume-"))
    try:
        model = build_tiny_mixtral(work / "model", TOKENIZER_512, seed=0)
        identical, interrupted = soak(model, C4_SAMPLE, work, args.points, args.seed)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{identical}/{interrupted} interrupted runs resumed to a byte-identical file "
          f"({args.points - interrupted} kills came after the run had finished)")
    return 0 if identical == interrupted else 1


if __name__ == "__main__":
    sys.exit(main())
