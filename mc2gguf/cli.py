"""The ``mc2gguf`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import Mc2ggufError
from .qtypes import QUANT_TYPES, quant_type


def _cmd_convert(args: argparse.Namespace) -> None:
    from .convert import convert

    result = convert(Path(args.src), Path(args.out), quant_type(args.type), force=args.force)
    print(f"wrote {result.out} ({result.size:,} bytes)")


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
