"""``mc2gguf eval``: perplexity of a model in PyTorch, as llama-perplexity computes it, with or without ODP.

Perplexity is llama-perplexity's definition (``perplexity.py`` states it), so the two can be compared number for
number. The model (``model.py``) runs through the architecture adapter's own forward (``mc2gguf/archs``), one window at a time,
with every layer's weights held in memory as float32. With ``--gguf`` *every* tensor the adapter maps (token
embeddings, attention, norms, router, experts, output) is read from the GGUF file and dequantized, experts
stored as type groups (``docs/gguf-layout.md``) included, so the Python model runs exactly the weights that
llama.cpp would.

ODP: the router's decision goes through :func:`mc2gguf.odp.route` with the layer's ``mu`` (times
``--mu-scale``) and the protected tokens of the chosen variant (``--protection``):

- ``none``: nobody is protected;
- ``attention``: the paper's prefill importance ``||t_j||_1 x`` mean attention received
  (:func:`mc2gguf.odp.token_importance` on :func:`mc2gguf.odp.attention_received_from_qk` of the layer's
  own post-RoPE queries and keys), the top ``--protect`` fraction of the window protected;
- ``norm``: the decode proxy ``||t||_1 > tau`` with the layer's calibrated ``tau``;
- ``both``: the union.

``mu``/``tau`` come from the GGUF's ``mc2gguf.odp.*`` metadata, from a JSON file of the same form
(``--odp-params``), or are calibrated (``--calibrate-odp FILE``: the median top-2 weight ratio per layer and
the norm threshold that exactly ``--protect`` of the calibration tokens exceed, on the model as loaded with
ODP off). The skip ratio is the pruned slots (the op's ``n_pruned``) over the routed slots (tokens x top-k
x layers) of every evaluated window.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import Mc2ggufError
from ..odp.params import OdpParams
from ..text import load_tokenizer
from .model import (DEFAULT_PROTECT_RATIO, DEFAULT_PROTECTION, PROTECTIONS, EvalModel, OdpCalibration, OdpConfig,
                    RunStats, calibrate_odp)
from .perplexity import (PerplexityAccumulator, Windows, interpolate_at, llama_tokenize, perplexity_windows,
                         read_eval_text, tokenize_text, tokenizer_adds_bos)

__all__ = ["DEFAULT_PROTECT_RATIO", "DEFAULT_PROTECTION", "PROTECTIONS", "EvalModel", "EvalOptions", "EvalResult",
           "OdpCalibration", "OdpConfig", "OdpParams", "PerplexityAccumulator", "RunStats", "Windows",
           "calibrate_odp", "compare_at_equal_skip", "evaluate_windows", "interpolate_at", "llama_tokenize",
           "load_tokenizer", "perplexity_windows", "read_eval_text", "run_eval", "tokenize_text",
           "tokenizer_adds_bos"]


@dataclass
class EvalResult:
    odp: bool
    protection: str | None
    mu_scale: float | None
    ppl: float
    ppl_stderr: float
    nll: float
    scored_tokens: int
    chunk_ppl: list[float]
    skip_ratio: float
    n_pruned: int
    n_routed: int
    per_layer_skip: list[float]
    protected_fraction: float
    seconds: float

    @property
    def label(self) -> str:
        return "odp off" if not self.odp else f"{self.protection}, mu x {self.mu_scale:g}"


def evaluate_windows(model: EvalModel, windows: Windows, odp_cfg: OdpConfig | None = None,
                     on_chunk: Callable[[int, PerplexityAccumulator], None] | None = None) -> EvalResult:
    """Perplexity of ``model`` over ``windows`` (llama-perplexity's definition) and ODP's statistics."""
    acc = PerplexityAccumulator()
    stats = RunStats(model.n_layers)
    t0 = time.perf_counter()
    for c in range(windows.n_chunk):
        logits = model.forward(windows.inputs[c], odp_cfg, stats)
        acc.add_chunk(logits, windows.targets[c], windows.first)
        if on_chunk is not None:
            on_chunk(c, acc)
    return EvalResult(
        odp=odp_cfg is not None,
        protection=None if odp_cfg is None else odp_cfg.protection,
        mu_scale=None if odp_cfg is None else odp_cfg.mu_scale,
        ppl=acc.ppl, ppl_stderr=acc.stderr, nll=acc.nll / acc.count, scored_tokens=acc.count,
        chunk_ppl=list(acc.chunk_ppl), skip_ratio=stats.skip_ratio, n_pruned=sum(stats.n_pruned),
        n_routed=sum(stats.n_routed),
        per_layer_skip=[p / r if r else 0.0 for p, r in zip(stats.n_pruned, stats.n_routed)],
        protected_fraction=sum(stats.n_protected) / max(1, stats.n_tokens * model.n_layers),
        seconds=time.perf_counter() - t0,
    )


def compare_at_equal_skip(results: Sequence[EvalResult]) -> tuple[float, dict[str, float | None]] | None:
    """Per protection variant, the PPL interpolated (over its ``--mu-scale`` points) at one common skip ratio:
    the lowest skip ratio the variants reach at ``mu x 1``."""
    by_variant: dict[str, list[EvalResult]] = {}
    for r in results:
        if r.odp:
            by_variant.setdefault(r.protection, []).append(r)
    at_one = [r.skip_ratio for rs in by_variant.values() for r in rs if r.mu_scale == 1.0]
    if len(by_variant) < 2 or not at_one:
        return None
    target = min(at_one)
    return target, {v: interpolate_at([(r.skip_ratio, r.ppl) for r in rs], target) for v, rs in by_variant.items()}


# --------------------------------------------------------------------------------------------------------
# The command


@dataclass
class EvalOptions:
    model: Path
    text: Path
    gguf: Path | None = None
    odp: str | None = None  # "on", "off", None = on when ODP parameters are available
    protections: tuple[str, ...] = (DEFAULT_PROTECTION,)
    protect: float | None = None
    mu_scales: tuple[float, ...] = (1.0,)
    ctx: int = 512
    chunks: int | None = None
    calibrate_odp: tuple[Path, ...] = ()
    calib_samples: int = 16
    calib_seqlen: int | None = None
    seed: int = 0
    odp_params: Path | None = None
    save_odp: Path | None = None
    json_out: Path | None = None
    threads: int | None = None
    tokenizer: str = "auto"  # "llama" (llama.cpp's, needs --gguf), "hf", "auto" = llama with --gguf


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_eval(opts: EvalOptions, out=None) -> dict:
    """``mc2gguf eval``: returns what ``--json`` writes; prints llama-perplexity-like lines to ``out`` (stdout)."""
    out = sys.stdout if out is None else out
    if opts.threads:
        torch.set_num_threads(opts.threads)
    for p in opts.protections:
        if p not in PROTECTIONS:
            raise Mc2ggufError(f"--protection must be among {', '.join(PROTECTIONS)}, got {p!r}")
    if opts.odp not in (None, "on", "off"):
        raise Mc2ggufError(f"--odp must be on or off, got {opts.odp!r}")
    if opts.calibrate_odp and opts.odp_params:
        raise Mc2ggufError("give either --calibrate-odp or --odp-params, not both")
    text = read_eval_text(opts.text)  # fail on a missing file before loading the model
    for f in opts.calibrate_odp:
        if not Path(f).is_file():
            raise Mc2ggufError(f"calibration file {f} not found")
    tokenizer = load_tokenizer(opts.model)
    t0 = time.perf_counter()
    model = EvalModel(opts.model, opts.gguf)
    _log(f"loaded {opts.model}" + (f" with the weights of {opts.gguf}" if opts.gguf else "") +
         f" ({model.n_layers} layers) in {time.perf_counter() - t0:.1f} s")

    add_bos = model.gguf_add_bos if model.gguf_add_bos is not None else tokenizer_adds_bos(tokenizer)
    bos_id = model.gguf_bos_id if model.gguf_bos_id is not None else tokenizer.bos_token_id
    use_llama = opts.tokenizer == "llama"
    if opts.tokenizer == "auto" and opts.gguf is not None:
        from ..llama.build import find_llama_build

        try:
            find_llama_build()
            use_llama = True
        except Mc2ggufError:
            _log("note: the pinned llama.cpp is not built: tokenizing with the Hugging Face tokenizer, which can "
                 "differ from llama.cpp's (e.g. on a leading space); `mc2gguf build-llama` fixes that")
    if use_llama:
        if opts.gguf is None:
            raise Mc2ggufError("--tokenizer llama needs --gguf (the vocabulary llama.cpp reads)")
        tokens, add_bos = llama_tokenize(opts.gguf, text)
    elif opts.tokenizer not in ("auto", "hf"):
        raise Mc2ggufError(f"--tokenizer must be auto, llama or hf, got {opts.tokenizer!r}")
    else:
        tokens = tokenize_text(tokenizer, text, add_bos, bos_id)
    windows = perplexity_windows(tokens, opts.ctx, opts.chunks, add_bos, bos_id, what=str(opts.text))

    params: OdpParams | None = None
    calibration = None
    if opts.calibrate_odp:
        ratio = DEFAULT_PROTECT_RATIO if opts.protect is None else opts.protect
        calibration = calibrate_odp(model, opts.calibrate_odp, ratio, opts.calib_samples,
                                    opts.calib_seqlen or opts.ctx, opts.seed, progress=True)
        params = calibration.params
    elif opts.odp_params:
        params = OdpParams.load(opts.odp_params)
    elif model.gguf_odp is not None:
        params = model.gguf_odp
    if params is not None:
        params.check(model.n_layers)
        if opts.protect is not None and opts.protect != params.protect_ratio:
            if any(p in ("norm", "both") for p in opts.protections):
                raise Mc2ggufError(f"--protect {opts.protect} differs from the {params.protect_ratio} that the norm "
                                   f"thresholds of {params.source} were calibrated for: recalibrate with "
                                   "--calibrate-odp FILE")
            params = OdpParams(params.mu, params.protect_norm, float(opts.protect), params.source)
        if opts.save_odp:
            params.save(opts.save_odp)
            _log(f"wrote ODP parameters to {opts.save_odp}")
    use_odp = opts.odp == "on" or (opts.odp is None and params is not None)
    if use_odp and params is None:
        raise Mc2ggufError("--odp on needs mu per layer: a --gguf file with mc2gguf.odp metadata, --odp-params "
                           "JSON or --calibrate-odp FILE")

    runs: list[OdpConfig | None] = []
    grid = len(opts.protections) > 1 or len(opts.mu_scales) > 1
    if not use_odp or grid:
        runs.append(None)
    if use_odp:
        runs += [OdpConfig(params, p, s) for p in opts.protections for s in opts.mu_scales]

    print(f"perplexity: {opts.text}: {len(tokens)} tokens ({'llama.cpp' if use_llama else 'Hugging Face'} tokenizer, "
          f"BOS {'added' if add_bos else 'not added'}), "
          f"{windows.n_chunk} chunks of {windows.n_ctx}, scoring the last {windows.scored_per_chunk} tokens of "
          f"each ({windows.n_chunk * windows.scored_per_chunk} in all)", file=out)
    if params is not None and use_odp:
        print(f"ODP: mu per layer {', '.join(f'{m:.3f}' for m in params.mu)} ({params.source}); "
              f"protect_ratio {params.protect_ratio:g}", file=out)
    results = []
    for cfg in runs:
        label = "odp off" if cfg is None else f"odp on, protection {cfg.protection}, mu x {cfg.mu_scale:g}"
        print(f"[{label}]", file=out)

        def on_chunk(c, acc, _out=out):
            print(f"[{c + 1}]{acc.chunk_ppl[-1]:.4f},", end="", file=_out, flush=True)

        r = evaluate_windows(model, windows, cfg, on_chunk)
        print(file=out)
        print(f"Final estimate: PPL = {r.ppl:.4f} +/- {r.ppl_stderr:.5f}" +
              (f"   skip ratio {r.skip_ratio:.4f} ({r.n_pruned} of {r.n_routed} routed slots), protected "
               f"{r.protected_fraction:.4f} of tokens" if r.odp else "") + f"   ({r.seconds:.1f} s)", file=out)
        results.append(r)
    comparison = compare_at_equal_skip(results)
    if grid:
        print("\n| run | skip ratio | PPL | +/- |\n|---|---|---|---|", file=out)
        for r in results:
            print(f"| {r.label} | {r.skip_ratio:.4f} | {r.ppl:.4f} | {r.ppl_stderr:.4f} |", file=out)
        if comparison is not None:
            target, ppl_at = comparison
            print(f"\nPPL at equal skip ratio {target:.4f} (interpolated over --mu-scale): " +
                  ", ".join(f"{v} {'n/a' if p is None else f'{p:.4f}'}" for v, p in ppl_at.items()), file=out)
    report = {
        "model": str(opts.model), "gguf": None if opts.gguf is None else str(opts.gguf),
        "gguf_types": model.gguf_types or None, "text": str(opts.text), "tokens": len(tokens), "add_bos": add_bos,
        "n_ctx": windows.n_ctx, "chunks": windows.n_chunk, "scored_tokens": windows.n_chunk * windows.scored_per_chunk,
        "tokenizer": "llama.cpp" if use_llama else "hf",
        "odp_params": None if params is None else params.to_json(),
        "runs": [asdict(r) for r in results],
        "equal_skip": None if comparison is None else {"skip_ratio": comparison[0], "ppl": comparison[1]},
    }
    if opts.json_out:
        Path(opts.json_out).write_text(json.dumps(report, indent=1, default=str) + "\n")
        _log(f"wrote {opts.json_out}")
    return report
