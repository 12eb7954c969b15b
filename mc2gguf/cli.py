"""The ``mc2gguf`` command line."""

from __future__ import annotations

import argparse
import os
import re
import sys
import textwrap
from pathlib import Path

from .errors import Mc2ggufError
from .quant.types import DEFAULT_PALETTE, QUANT_TYPES, quant_type


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """``14GiB``, ``800MB``, ``123456`` -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 14GiB, 800MB, 123456)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def _cmd_convert(args: argparse.Namespace) -> None:
    if args.bpw is None and args.size is None:
        from .convert import convert

        result = convert(Path(args.src), Path(args.out), quant_type(args.type), force=args.force)
        print(f"wrote {result.out} ({result.size:,} bytes)")
        return
    from .pmq.allocate import Objective
    from .pmq import PMQOptions, run_pmq

    palette = tuple(quant_type(t).name for t in args.palette.split(","))
    reference = quant_type(args.speed_reference).name
    costs = ()
    if args.min_speed is not None:
        if not args.min_speed > 0:
            raise Mc2ggufError(f"--min-speed must be > 0, got {args.min_speed}")
        costs = tuple(sorted(_type_costs(args, sorted({*palette, reference})).seconds_per_weight.items()))
    opts = PMQOptions(
        calib=tuple(Path(c) for c in args.calib), nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
        bpw=args.bpw, size=args.size, palette=palette,
        objective=Objective(args.alpha, args.beta, args.gamma), per_layer_budget=args.per_layer_budget,
        granularity=args.granularity, tie_gate_up=not args.untie_gate_up, layout=args.layout,
        attn_type=quant_type(args.attn_type).name, eps_method=args.eps_method, eps_tokens=args.eps_tokens,
        sequential=args.sequential, act_order=args.act_order, damp=args.damp, protect_ratio=args.protect_ratio,
        min_speed=args.min_speed, speed_reference=reference, type_costs=costs,
    )
    result = run_pmq(Path(args.src), Path(args.out), opts, force=args.force, dry_run=args.dry_run,
                     work_dir=Path(args.work_dir) if args.work_dir else None)
    if result.out is not None:
        print(f"wrote {result.out} ({result.size:,} bytes) and its report {result.out}.report.json/.png")


def _type_costs(args: argparse.Namespace, types: list[str]):
    """``--type-costs FILE`` (every type needed must be in it), else measured now on this machine (cached)."""
    from .type_costs import TypeCosts, measure_type_costs

    if not args.type_costs:
        return measure_type_costs(types, threads=args.speed_threads)
    costs = TypeCosts.load(Path(args.type_costs))
    missing = [t for t in types if t not in costs.seconds_per_weight]
    if missing:
        raise Mc2ggufError(f"{args.type_costs} has no decode cost for {', '.join(missing)}")
    return costs


def _cmd_type_costs(args: argparse.Namespace) -> None:
    from .type_costs import measure_type_costs

    types = [quant_type(t).name for t in args.types.split(",")]
    costs = measure_type_costs(types, threads=args.threads, probe=args.probe, rounds=args.rounds,
                               refresh=args.refresh)
    print(costs.render(quant_type(args.reference).name))
    if args.out:
        costs.save(Path(args.out))
        print(f"wrote {args.out}")


def _cmd_inspect(args: argparse.Namespace) -> None:
    from .gguf.inspect import render, summarize

    print(render(summarize(Path(args.file))))
    if args.verify:
        _cmd_verify(args)


def _cmd_verify(args: argparse.Namespace) -> None:
    from .gguf.writer import verify

    result = verify(Path(args.file))
    if result.damaged:
        raise Mc2ggufError(f"{args.file}: {len(result.damaged)} of {result.n_tensors} tensors do not match their "
                           f"checksums (a damaged or altered file): {', '.join(result.damaged[:10])}"
                           + (", ..." if len(result.damaged) > 10 else ""))
    print(f"{args.file}: all {result.n_tensors} tensors match their checksums")


def _cmd_build_llama(args: argparse.Namespace) -> None:
    from .llama.build import BuildConfig, build_llama, compile_check_cuda

    if args.cuda_compile_check:
        units = compile_check_cuda(args.cuda_archs, jobs=args.jobs)
        print(f"compiled for sm_{args.cuda_archs.replace(';', ', sm_')}: {', '.join(units)}")
        return
    build = build_llama(BuildConfig(cuda=args.cuda, cuda_archs=args.cuda_archs), jobs=args.jobs)
    print(build.bin_dir)


def _cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo, run_tiny_demo

    if args.tiny:
        run_tiny_demo(Path(args.workdir), quant_type(args.type), args.prompt)
    else:
        run_demo(Path(args.workdir), args.prompt, args.bpw)


def _cmd_bench(args: argparse.Namespace) -> None:
    from .bench import LLAMA_TYPES, Bench, BenchConfig, update_readme
    from .paths import C4_SAMPLE, TINYSTORIES, WIKITEXT_TEST
    from .reference import build_reference_moe

    model = Path(args.model) if args.model else build_reference_moe().path
    calib = args.calib or (C4_SAMPLE, TINYSTORIES)
    config = BenchConfig(
        model=model, work=Path(args.work), calib=tuple(Path(c) for c in calib),
        eval_text=Path(args.eval) if args.eval else WIKITEXT_TEST, ctx=args.ctx, chunks=args.chunks,
        threads=args.threads, seed=args.seed, llama_types=tuple(t for t in args.llama_types.split(",") if t) if args.llama_types is not None else LLAMA_TYPES,
        bpws=tuple(float(b) for b in args.bpw.split(",") if b), layouts=tuple(l for l in args.layouts.split(",") if l),
        nsamples=args.nsamples, seqlen=args.seqlen, eps_tokens=args.eps_tokens, speed=not args.no_speed,
        min_speeds=tuple(float(v) for v in args.min_speeds.split(",") if v),
    )
    Bench(config).run()
    print((config.work / "results.md").read_text())
    if args.readme:
        update_readme(Path(args.readme), config.work)
        print(f"updated the results section of {args.readme}")


def _cmd_bench_speed(args: argparse.Namespace) -> None:
    from .bench_speed import SpeedConfig, run_speed_bench, update_readme

    config = SpeedConfig(work=Path(args.work), shapes=tuple(s for s in args.shapes.split(",") if s),
                         rounds=args.rounds, n_prompt=args.n_prompt, n_gen=args.n_gen, threads=args.threads,
                         unpatched=args.unpatched)
    run_speed_bench(config)
    print((config.work / "speed.md").read_text())
    if args.readme:
        update_readme(Path(args.readme), config.work)
        print(f"updated the speed section of {args.readme}")


def _cmd_build_reference(args: argparse.Namespace) -> None:
    from .reference import build_reference_moe, default_out_dir

    result = build_reference_moe(
        Path(args.out).expanduser() if args.out else default_out_dir(),
        Path(args.calib) if args.calib else None, seed=args.seed, n_tokens=args.tokens,
        expert_width=args.width, evaluate=not args.no_eval, wikitext=Path(args.wikitext) if args.wikitext else None,
    )
    stamp = result.stamp
    print(("found cached build" if result.cached else f"built in {stamp['build_seconds']:.0f} s") +
          f": {stamp['parameters']['total'] / 1e6:.1f}M parameters ({stamp['parameters']['active'] / 1e6:.1f}M active)")
    if "perplexity" in stamp:
        ppl = stamp["perplexity"]
        print(f"{ppl['dataset']} perplexity ({ppl['tokens']} tokens, {ppl['windows']} windows of {ppl['window']}): "
              f"dense {ppl['dense']:.2f}, MoE {ppl['moe']:.2f} ({ppl['ratio']:.2f}x dense)")
    print(result.path)


def _cmd_eval(args: argparse.Namespace) -> None:
    from .evaluate import EvalOptions, run_eval

    def floats(text: str) -> tuple[float, ...]:
        try:
            return tuple(float(v) for v in text.split(","))
        except ValueError:
            raise Mc2ggufError(f"--mu-scale takes comma-separated numbers, got {text!r}") from None

    run_eval(EvalOptions(
        model=Path(args.model), text=Path(args.text), gguf=Path(args.gguf) if args.gguf else None, odp=args.odp,
        protections=tuple(args.protection.split(",")), protect=args.protect, mu_scales=floats(args.mu_scale),
        ctx=args.ctx, chunks=args.chunks, calibrate_odp=tuple(Path(c) for c in args.calibrate_odp),
        calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen, seed=args.seed,
        odp_params=Path(args.odp_params) if args.odp_params else None,
        save_odp=Path(args.save_odp) if args.save_odp else None,
        json_out=Path(args.json) if args.json else None, threads=args.threads, tokenizer=args.tokenizer,
    ))


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return text == "on"


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a ratio between 0 and 1, got {text!r}")
    return value


def _add_run_options(p: argparse.ArgumentParser, ctx_help: str) -> None:
    p.add_argument("model", help="GGUF file")
    p.add_argument("--ctx", type=int, default=4096, help=ctx_help)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: llama.cpp's choice)")
    p.add_argument("--moe-prune", type=_on_off, default=None, metavar="on|off",
                   help="ODP: drop a token's second expert when its routing weight is small next to the first's "
                        "(default: on for files with ODP metadata)")
    p.add_argument("--moe-protect", type=_ratio, default=None, metavar="RATIO",
                   help="ODP: fraction of tokens never pruned (default: the calibrated fraction in the file)")
    p.add_argument("--gpu-layers", type=int, default=None, metavar="N",
                   help="layers in GPU memory (-1: all; default: llama.cpp's); CPU-only builds ignore it")
    p.add_argument("--cpu-moe", action="store_true", help="keep every layer's experts in system memory")
    p.add_argument("--n-cpu-moe", type=int, default=None, metavar="N",
                   help="keep the experts of the first N layers in system memory")


def _placement(args: argparse.Namespace):
    from .llama.interactive import Placement

    return Placement(gpu_layers=args.gpu_layers, cpu_moe=args.cpu_moe, n_cpu_moe=args.n_cpu_moe)


def _cmd_chat(args: argparse.Namespace) -> int:
    from .llama.interactive import run_chat

    return run_chat(Path(args.model), system=args.system, n_ctx=args.ctx, n_threads=args.threads,
                    max_tokens=args.max_tokens, temperature=args.temp, seed=args.seed, moe_prune=args.moe_prune,
                    moe_protect=args.moe_protect, placement=_placement(args))


def _cmd_serve(args: argparse.Namespace) -> int:
    from .llama.interactive import run_server

    return run_server(Path(args.model), host=args.host, port=args.port, n_ctx=args.ctx, n_threads=args.threads,
                      parallel=args.parallel, moe_prune=args.moe_prune, moe_protect=args.moe_protect,
                      placement=_placement(args), extra=args.server_args)


DESCRIPTION = """\
mc2gguf compresses Mixture-of-Experts LLMs (Mixtral-style) with MC-MoE and exports them to GGUF for llama.cpp.
PMQ, pre-loading mixed-precision quantization, gives each expert its own quantization type under a
bits-per-weight or file-size budget, from its measured importance and quantization error. ODP, online dynamic
pruning, skips a token's second expert at run time when its routing weight is small next to the first's. The
files run in a pinned llama.cpp with the project's patches (mc2gguf build-llama builds and caches it)."""

COMMON_COMMANDS = """\
common commands:
  mc2gguf demo
      compress the built-in reference MoE with PMQ, then run it in llama.cpp with ODP
  mc2gguf convert ./Mixtral-8x7B-v0.1 mixtral-2.5bpw.gguf --bpw 2.5 --calib c4.jsonl
      PMQ: each expert in its own type, 2.5 bits per expert weight on average
  mc2gguf chat mixtral-2.5bpw.gguf
      chat with the result in the terminal (ODP pruning on)

`mc2gguf COMMAND --help` shows a command's options and an example."""


def _wrap(text: str) -> str:
    """Paragraphs (separated by blank lines) filled to 79 columns: the raw formatter keeps line breaks as given."""
    return "\n\n".join(textwrap.fill(" ".join(par.split()), 79, break_on_hyphens=False) for par in text.split("\n\n"))


def _command(sub, name: str, summary: str, description: str, example: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand: ``summary`` in ``mc2gguf --help``; its own help opens with ``description`` and ends
    with ``example``, both printed with their line breaks."""
    return sub.add_parser(name, help=summary, description=_wrap(description), epilog="example:\n  " + example,
                          formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mc2gguf", description=_wrap(DESCRIPTION), epilog=COMMON_COMMANDS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    type_help = f"GGUF type of the weight matrices (one of {', '.join(QUANT_TYPES)})"

    p = _command(sub, "convert", "convert a Hugging Face MoE checkpoint to GGUF, one type or PMQ mixed precision",
                 "Convert a Hugging Face MoE checkpoint (Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE, DeepSeek-V2/V3: config.json, safetensors shards, tokenizer) to GGUF, "
                 "one tensor at a time.\n\n"
                 "Without --bpw or --size, every weight matrix gets --type (with llama.cpp's usual exceptions: "
                 "norms and router in F32, the output projection at least Q6_K).\n\n"
                 "With --bpw or --size, PMQ mixed precision: run the --calib text through the model one layer at "
                 "a time, measure each expert's error in each --palette type with the real quantizer, choose the "
                 "types by an integer program under the budget, quantize the experts with GPTQ, and store ODP's "
                 "pruning thresholds in the file. A report (JSON and plot) is written beside it; an interrupted "
                 "run resumes from its work directory.",
                 "mc2gguf convert ./Mixtral-8x7B-v0.1 mixtral-2.5bpw.gguf --bpw 2.5 --calib c4.jsonl")
    p.add_argument("src", help="Hugging Face model directory (config.json, *.safetensors, tokenizer)")
    p.add_argument("out", help="output .gguf file")
    p.add_argument("--type", default="F16", help=type_help + "; default F16")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    pmq = p.add_argument_group("PMQ mixed precision (with --bpw or --size)")
    budget = pmq.add_mutually_exclusive_group()
    budget.add_argument("--bpw", type=float, help="budget: average bits per expert weight")
    budget.add_argument("--size", type=parse_size, help="budget: total file size, e.g. 14GiB")
    pmq.add_argument("--calib", action="append", default=[], metavar="FILE",
                     help="calibration text (plain text or JSONL with a 'text' field); repeat to mix domains; "
                          "without it the model samples its own text")
    pmq.add_argument("--nsamples", type=int, default=128, help="calibration sequences (default 128)")
    pmq.add_argument("--seqlen", type=int, default=2048, help="tokens per sequence (default 2048)")
    pmq.add_argument("--seed", type=int, default=0)
    pmq.add_argument("--palette", default=",".join(DEFAULT_PALETTE), help="candidate expert types, comma-separated")
    pmq.add_argument("--alpha", type=float, default=1.0, help="exponent of the access frequency (default 1)")
    pmq.add_argument("--beta", type=float, default=1.0, help="exponent of the routing weight (default 1)")
    pmq.add_argument("--gamma", type=float, default=2.0, help="exponent of the error eps (default 2)")
    pmq.add_argument("--per-layer-budget", action="store_true",
                     help="the paper's per-layer budget (each layer its share, >= 1 expert at the highest and "
                          "one at the middle type)")
    pmq.add_argument("--granularity", choices=("expert", "projection"), default="expert",
                     help="one type per expert, or per projection (default: expert)")
    pmq.add_argument("--untie-gate-up", action="store_true",
                     help="with --granularity projection: let gate and up take different types")
    pmq.add_argument("--layout", choices=("mixed", "stock"), default="mixed",
                     help="stock: one type per layer and projection, runs on unpatched llama.cpp")
    pmq.add_argument("--attn-type", default="Q4_K", help="type of attention and other non-expert matrices")
    pmq.add_argument("--eps-method", choices=("gptq", "rtn"), default="gptq",
                     help="quantizer used to measure eps (default gptq, what is written)")
    pmq.add_argument("--eps-tokens", type=int, default=4096, help="routed tokens per expert sampled for eps")
    pmq.add_argument("--sequential", action="store_true",
                     help="calibrate each layer on the outputs of the already-quantized earlier layers")
    pmq.add_argument("--act-order", action="store_true", help="GPTQ in order of decreasing Hessian diagonal")
    pmq.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening (fraction of mean diag H)")
    pmq.add_argument("--protect-ratio", type=float, default=0.02, help="ODP: fraction of protected tokens")
    pmq.add_argument("--dry-run", action="store_true", help="measure and print the plan and exact size; write nothing")
    pmq.add_argument("--work-dir", help="per-layer checkpoints for resuming (default: OUT.mc2gguf-work)")
    speed = p.add_argument_group("speed (PMQ)")
    speed.add_argument("--min-speed", type=float,
                       help="the routed experts' predicted decode speed at least this many times that of "
                            "all-SPEED_REFERENCE experts, by measured decode costs per type (e.g. 1.2)")
    speed.add_argument("--speed-reference", default="Q4_K", help="the uniform type --min-speed is relative to")
    speed.add_argument("--type-costs", help="decode costs written by mc2gguf type-costs --out (default: measured "
                                            "now on this machine with the pinned llama.cpp, cached)")
    speed.add_argument("--speed-threads", type=int, default=2, help="threads of the measured decode (default 2)")
    p.set_defaults(func=_cmd_convert)

    p = _command(sub, "type-costs", "measure each GGUF type's decode cost per expert weight on this machine",
                 "Time llama-bench's decode on a random Mixtral-architecture probe whose every token reads all of "
                 "its experts, once per type with every expert tensor of that type; the token time outside the "
                 "experts is the intercept of two expert widths. Prints ns per expert weight and the ratios to "
                 "--reference per weight and per byte; cached per CPU, thread count and llama.cpp build. "
                 "convert --min-speed uses these costs.",
                 "mc2gguf type-costs --types IQ2_XXS,Q2_K,Q3_K,Q4_K --out costs.json")
    p.add_argument("--types", default=",".join(DEFAULT_PALETTE), help="comma-separated (default: PMQ's palette)")
    p.add_argument("--reference", default="Q4_K", help="the type the ratios are relative to (default Q4_K)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are used (default 3)")
    p.add_argument("--probe", default="default", choices=["default", "tiny"],
                   help="the probe model (tiny: for tests, noisier)")
    p.add_argument("--refresh", action="store_true", help="measure again instead of reading the cache")
    p.add_argument("--out", help="also write the costs to this JSON file (for convert --type-costs)")
    p.set_defaults(func=_cmd_type_costs)

    p = _command(sub, "inspect", "summarise a GGUF file: types, bits per weight, size",
                 "Summarise a GGUF file: architecture, tensor count, the type of every tensor, the bits per weight "
                 "of the experts and of the whole file, and its size.",
                 "mc2gguf inspect mixtral-2.5bpw.gguf")
    p.add_argument("file")
    p.add_argument("--verify", action="store_true", help="also check every tensor against its checksum")
    p.set_defaults(func=_cmd_inspect)

    p = _command(sub, "verify", "check every tensor of an mc2gguf GGUF file against the checksum written with it",
                 "Check every tensor's bytes against the checksum mc2gguf wrote into the file's metadata "
                 "(mc2gguf.tensor_checksums, blake2b-128): a damaged download or a truncated copy fails, naming the "
                 "tensors. GGUF itself has no checksums, so a loader cannot tell. Exit 0 when all match.",
                 "mc2gguf verify mixtral-2.5bpw.gguf")
    p.add_argument("file")
    p.set_defaults(func=_cmd_verify)

    p = _command(sub, "build-llama", "build the pinned, patched llama.cpp (cached); prints its bin directory",
                 "Build the pinned llama.cpp (commit 0c1e570, from the llama-cpp-python 0.3.36 sdist, downloaded "
                 "with pip) with the project's patches: its tools, shared libraries and the llama-cpp-python "
                 "bindings bound to that same library. The build is cached in $MC2GGUF_CACHE (default "
                 "~/.cache/mc2gguf), so later calls return at once; the first takes about 13 minutes on 2 cores. "
                 "Prints the directory of the binaries as its last line.",
                 "mc2gguf build-llama")
    p.add_argument("--cuda", action="store_true", help="build the CUDA backend too")
    p.add_argument("--cuda-archs", default="86;89", help="CUDA architectures (default: 86;89)")
    p.add_argument("--cuda-compile-check", action="store_true",
                   help="only compile the CUDA units the patches change, for --cuda-archs (no GPU needed, ~20 min)")
    p.add_argument("--jobs", type=int, default=None, help="parallel build jobs (default: all cores)")
    p.set_defaults(func=_cmd_build_llama)

    p = _command(sub, "bench", "mc2gguf vs llama.cpp's recipes on one model (default: the reference MoE): "
                 "PPL, KLD, same-top rate, ODP skip ratio, speed and conversion cost; table, JSON and plots",
                 "Compare mc2gguf's PMQ files (with and without ODP) against llama.cpp's own imatrix recipes on "
                 "one model (default: the reference MoE, built if missing): perplexity, KL divergence and "
                 "same-top-token rate against F16, ODP skip ratio, speed (llama-bench) and conversion cost. "
                 "Writes a table (results.md), JSON and plots into --work; a second run resumes.",
                 "mc2gguf bench --work bench-out --bpw 2.5")
    p.add_argument("--model", help="Hugging Face MoE directory of a supported family (default: the reference MoE, built if missing)")
    p.add_argument("--work", default="bench-out", help="files, logs and results; a second run resumes (default bench-out)")
    p.add_argument("--calib", action="append", help="calibration text for both imatrix and PMQ; repeat to mix "
                   "(default: ../shared/data C4 sample and TinyStories)")
    p.add_argument("--eval", help="evaluation text (default: ../shared/data WikiText-2 raw test)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=16, help="evaluation chunks of --ctx tokens (default 16; -1: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--llama-types", help="llama.cpp types quantized with the imatrix, comma-separated "
                   "(default: Q2_K,Q2_K_S,IQ2_XXS,IQ2_XS,IQ2_S,IQ1_M,Q3_K_S)")
    p.add_argument("--bpw", default="2.0,2.5,3.0", help="experts' bits per weight of the mc2gguf rows and layer mixes")
    p.add_argument("--layouts", default="mixed,stock", help="layouts of the mc2gguf rows (empty: no mc2gguf rows)")
    p.add_argument("--nsamples", type=int, default=64, help="calibration sequences (PMQ and imatrix; default 64)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eps-tokens", type=int, default=1024, help="routed tokens per expert on which PMQ measures "
                   "eps (default 1024; convert's default is 4096)")
    p.add_argument("--no-speed", action="store_true", help="skip llama-bench")
    p.add_argument("--min-speeds", default="",
                   help="comma-separated convert --min-speed values: PMQ rows at the middle --bpw, first layout, "
                        "with the experts' decode speed bounded (costs measured once by mc2gguf type-costs)")
    p.add_argument("--readme", help="write the results into this README's results section")
    p.set_defaults(func=_cmd_bench)

    p = _command(sub, "bench-speed", "llama.cpp's speed on mc2gguf's layouts vs stock files (type groups, ODP, "
                 "fused vs ordinary-op graph) on Mixtral- and Qwen3-shaped random models; table and JSON",
                 "Time llama-bench (prefill and decode) on seeded random models of real shapes (speed does not "
                 "depend on the values): a stock Q3_K file against a type-grouped file of about its size "
                 "(Q2_K/Q3_K/Q4_K experts), a same-type split, and ODP off and on at the calibrated mu; the "
                 "grouped and pruned files with the fused graph and with the graph of ordinary ops; optionally "
                 "an unpatched build on the stock file. Rounds are interleaved, so each ratio comes from one "
                 "run. Decode is also given as a share of the bound set by this machine's read bandwidth. "
                 "Writes speed.md and speed.json into --work; the model files are made once and kept there.",
                 "mc2gguf bench-speed --work speed-out --shapes mixtral,qwen3-30b-a3b --readme README.md")
    p.add_argument("--work", default="speed-out", help="model files and results (default speed-out)")
    p.add_argument("--shapes", default="mixtral,qwen3-30b-a3b,reference",
                   help="comma-separated: mixtral, qwen3-30b-a3b, reference, tiny (default: the first three)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported (default 3)")
    p.add_argument("--n-prompt", type=int, default=512, help="prefill tokens (default 512)")
    p.add_argument("--n-gen", type=int, default=128, help="decoded tokens (default 128)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--unpatched", action="store_true",
                   help="also time the stock file on an unpatched build of the same commit (built once, minutes)")
    p.add_argument("--readme", help="write the table into this README's speed section")
    p.set_defaults(func=_cmd_bench_speed)

    p = _command(sub, "build-reference", "build (or find cached) the real-weights reference MoE (8 experts, "
                 "top-2) from pretrained SmolLM2-135M-Instruct; prints its directory",
                 "Build (or find cached) the reference MoE: the pretrained SmolLM2-135M-Instruct turned into a "
                 "Mixtral with 8 experts, top-2, calibrated on the C4 sample; then measure its perplexity against "
                 "the dense model (skip with --no-eval). Prints its directory as its last line.",
                 "mc2gguf build-reference --no-eval")
    p.add_argument("--out", help="output directory (default: reference-moe in the mc2gguf cache, "
                                 "$MC2GGUF_CACHE or ~/.cache/mc2gguf)")
    p.add_argument("--calib", help="calibration text, plain or JSONL (default: ../shared/data/c4/c4-sample.jsonl "
                                   "beside the checkout)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokens", type=int, default=32768, help="calibration tokens, in windows of 1024 (default 32768)")
    p.add_argument("--width", type=int, default=768, help="expert width, a multiple of 256 (default 768)")
    p.add_argument("--wikitext", help="evaluation text (default: ../shared/data/wikitext-2-raw/wiki.test.raw)")
    p.add_argument("--no-eval", action="store_true", help="skip the dense vs MoE perplexity measurement")
    p.set_defaults(func=_cmd_build_reference)

    p = _command(sub, "eval", "perplexity in PyTorch as llama-perplexity computes it, optionally with the GGUF's "
                 "weights and ODP (docs/odp.md)",
                 "Perplexity of a Hugging Face Mixtral in PyTorch, computed as llama-perplexity computes it. With "
                 "--gguf it runs that file's weights (every tensor dequantized) and ODP with the file's thresholds, "
                 "and reports the share of skipped expert slots; comma-separated --protection or --mu-scale "
                 "compare variants (docs/odp.md).",
                 "mc2gguf eval ./Mixtral-8x7B-v0.1 --text wiki.test.raw --gguf mixtral-2.5bpw.gguf")
    p.add_argument("model", help="Hugging Face MoE directory of a supported family (config, weights, tokenizer)")
    p.add_argument("--text", required=True, help="evaluation text, e.g. ../shared/data/wikitext-2-raw/wiki.test.raw")
    p.add_argument("--gguf", help="run the weights of this GGUF (every tensor, dequantized) and use its ODP metadata")
    p.add_argument("--odp", choices=("on", "off"), help="default: on when ODP parameters are available")
    p.add_argument("--protection", default="norm",
                   help="none, attention, norm or both; comma-separated to compare (default: norm)")
    p.add_argument("--protect", type=float, help="fraction of protected tokens (default: the parameters', else 0.02)")
    p.add_argument("--mu-scale", default="1", help="multiply every layer's mu; comma-separated to sweep (default 1)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    p.add_argument("--chunks", type=int, help="evaluate at most this many chunks (default: all)")
    p.add_argument("--calibrate-odp", action="append", default=[], metavar="CALIB_FILE",
                   help="calibrate mu and the norm thresholds on this text (plain or JSONL); repeatable")
    p.add_argument("--calib-samples", type=int, default=16, help="calibration windows (default 16)")
    p.add_argument("--calib-seqlen", type=int, help="tokens per calibration window (default: --ctx)")
    p.add_argument("--seed", type=int, default=0, help="calibration window seed")
    p.add_argument("--odp-params", help="ODP parameters JSON (mu, protect_norm, protect_ratio), e.g. from --save-odp")
    p.add_argument("--save-odp", help="write the ODP parameters used (the converter's form) to this JSON")
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--tokenizer", choices=("auto", "llama", "hf"), default="auto",
                   help="llama: llama.cpp's own tokenization of the --gguf vocabulary (what llama-perplexity sees); "
                        "hf: the model directory's; auto (default): llama with --gguf when llama.cpp is built")
    p.set_defaults(func=_cmd_eval)

    p = _command(sub, "chat", "chat with a GGUF in the terminal (streamed, the file's chat template); "
                 "with piped input: one message per line",
                 "Chat with a GGUF in the terminal through the patched llama.cpp: answers streamed token by token "
                 "in the file's chat template, history kept across turns, ODP pruning on for files with ODP "
                 "metadata. Ctrl-C stops an answer; Ctrl-D or /exit quits, /reset clears the history. With piped "
                 "input: one message per line, each answer on stdout.",
                 "mc2gguf chat mixtral-2.5bpw.gguf --system \"You are a helpful assistant.\"")
    _add_run_options(p, "context size in tokens (default 4096); the oldest exchanges are dropped when it is full")
    p.add_argument("--system", help="system message")
    p.add_argument("--max-tokens", type=int, default=512, help="longest answer in tokens (default 512; 0: no limit)")
    p.add_argument("--temp", type=float, default=0.8, help="sampling temperature (default 0.8; 0: greedy)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.set_defaults(func=_cmd_chat)

    p = _command(sub, "serve", "serve a GGUF with the patched llama-server (OpenAI-compatible HTTP API)",
                 "Serve a GGUF with the patched llama-server: an OpenAI-compatible HTTP API under /v1 and "
                 "llama.cpp's /completion, on the loopback interface unless --host says otherwise, ODP pruning on "
                 "for files with ODP metadata. Prints the URL once it answers; arguments after -- go to "
                 "llama-server unchanged.",
                 "mc2gguf serve mixtral-2.5bpw.gguf --port 8080 -- --api-key KEY",
                 usage="%(prog)s [options] model [-- extra llama-server args]")
    _add_run_options(p, "context size in tokens, shared by the --parallel slots (default 4096)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--parallel", type=int, default=None, help="concurrent request slots (default: llama-server's)")
    p.set_defaults(func=_cmd_serve, server_args=[])

    p = _command(sub, "demo", "compress the reference MoE (real weights) with PMQ and run it in the patched "
                 "llama.cpp with ODP; --tiny: a small random Mixtral instead",
                 "The main job on a built-in model, for a first run: build llama.cpp and the reference MoE if "
                 "needed (both cached), compress it with PMQ to --bpw bits per expert weight (calibration cut to "
                 "32 x 512 tokens and four candidate types, to take minutes), then continue --prompt with the "
                 "patched llama-completion, ODP on, and print the share of pruned expert slots. --tiny converts a "
                 "small seeded random Mixtral to one --type instead: seconds, but random text.",
                 "mc2gguf demo --bpw 2.5 --prompt \"Once upon a time\"")
    p.add_argument("--workdir", default="mc2gguf-demo", help="where the GGUF and work files go (default: ./mc2gguf-demo)")
    p.add_argument("--bpw", type=float, default=2.5, help="experts' bits per weight (default 2.5)")
    p.add_argument("--prompt", default="Once upon a time", help="prompt for llama.cpp")
    p.add_argument("--tiny", action="store_true", help="a small seeded random Mixtral converted to --type: "
                   "seconds instead of minutes, random text")
    p.add_argument("--type", default="Q4_K", help=type_help + "; with --tiny; default Q4_K")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = []
    if "--" in argv:  # `serve ... -- ARGS`: ARGS go to llama-server untouched
        argv, passthrough = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    if passthrough:
        if not hasattr(args, "server_args"):
            parser.error(f"arguments after '--' are only for `mc2gguf serve`: {' '.join(passthrough)}")
        args.server_args = passthrough
    try:
        status = args.func(args)
    except Mc2ggufError as e:
        print(f"mc2gguf: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mc2gguf: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mc2gguf inspect F | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
