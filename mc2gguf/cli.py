"""The ``mc2gguf`` command line."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from .errors import Mc2ggufError
from .qtypes import DEFAULT_PALETTE, QUANT_TYPES, quant_type


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
    from .allocate import Objective
    from .pmq import PMQOptions, run_pmq

    opts = PMQOptions(
        calib=tuple(Path(c) for c in args.calib), nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
        bpw=args.bpw, size=args.size, palette=tuple(quant_type(t).name for t in args.palette.split(",")),
        objective=Objective(args.alpha, args.beta, args.gamma), per_layer_budget=args.per_layer_budget,
        granularity=args.granularity, tie_gate_up=not args.untie_gate_up, layout=args.layout,
        attn_type=quant_type(args.attn_type).name, eps_method=args.eps_method, eps_tokens=args.eps_tokens,
        sequential=args.sequential, act_order=args.act_order, damp=args.damp, protect_ratio=args.protect_ratio,
    )
    result = run_pmq(Path(args.src), Path(args.out), opts, force=args.force, dry_run=args.dry_run,
                     work_dir=Path(args.work_dir) if args.work_dir else None)
    if result.out is not None:
        print(f"wrote {result.out} ({result.size:,} bytes) and its report {result.out}.report.json/.png")


def _cmd_inspect(args: argparse.Namespace) -> None:
    from .inspect_gguf import render, summarize

    print(render(summarize(Path(args.file))))


def _cmd_build_llama(args: argparse.Namespace) -> None:
    from .llama_build import BuildConfig, build_llama

    build = build_llama(BuildConfig(cuda=args.cuda, cuda_archs=args.cuda_archs), jobs=args.jobs)
    print(build.bin_dir)


def _cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(Path(args.workdir), quant_type(args.type), args.prompt)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mc2gguf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    type_help = f"GGUF type of the weight matrices (one of {', '.join(QUANT_TYPES)})"

    p = sub.add_parser("convert", help="convert a Hugging Face Mixtral checkpoint to GGUF")
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
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("inspect", help="summarise a GGUF file: types, bits per weight, size")
    p.add_argument("file")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("build-llama", help="build the pinned, patched llama.cpp (cached); prints its bin directory")
    p.add_argument("--cuda", action="store_true", help="build the CUDA backend too")
    p.add_argument("--cuda-archs", default="86;89", help="CUDA architectures (default: 86;89)")
    p.add_argument("--jobs", type=int, default=None, help="parallel build jobs (default: all cores)")
    p.set_defaults(func=_cmd_build_llama)

    p = sub.add_parser("demo", help="build a small seeded Mixtral, convert it and run it in llama.cpp")
    p.add_argument("--workdir", default="mc2gguf-demo", help="where the model and GGUF go (default: ./mc2gguf-demo)")
    p.add_argument("--type", default="Q4_K", help=type_help + "; default Q4_K")
    p.add_argument("--prompt", default="Once upon a time", help="prompt for llama.cpp")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except Mc2ggufError as e:
        print(f"mc2gguf: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mc2gguf: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
