"""The package layout is the pipeline (docs/architecture.md): imports go downward, never in a cycle, and
nothing heavy is loaded by the command line or by importing the ODP package."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mc2gguf"

# Lower levels never import higher ones (docs/architecture.md, "What each package owns").
LEVELS = [
    ("mc2gguf", "errors", "paths", "gguf.keys", "quant.types", "quant.bits"),  # "mc2gguf": its __version__
    ("checkpoint", "text", "odp", "gguf.layout", "gguf.writer", "quant.grid", "quant.kquants", "quant.legacy",
     "quant.ternary", "quant.ggml_lib", "quant.codec", "quant.gptq", "llama.build"),
    ("archs", "gguf.upstream", "gguf.edit", "llama.runtime"),
    ("quant.plan", "gguf.reader", "gguf.inspect"),
    ("pmq", "evaluate", "reference", "llama.interactive", "testmodel"),
    ("convert", "bench", "bench_speed", "type_costs", "demo"),
    ("cli",),
]


def _level(module: str) -> int:
    name = module.removeprefix("mc2gguf.")
    for level, names in enumerate(LEVELS):
        if any(name == n or name.startswith(n + ".") for n in names):
            return level
    raise AssertionError(f"{module} is in no level of LEVELS: add it where it belongs")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if parts[-1] != "__main__":
            out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, bool]]:
    """``(imported mc2gguf module, at module level)`` for every import in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from pkg import module` imports that module
                full = f"{target}.{alias.name}"
                found.append((full if full in modules else target, id(node) in top))
        elif isinstance(node, ast.Import):
            found += [(a.name, id(node) in top) for a in node.names]
    return [(t, at_top) for t, at_top in found if t in modules and t != name]


def test_imports_go_downward_and_have_no_cycle():
    modules = _modules()
    graph: dict[str, set[str]] = {}
    upward = []
    for name, path in modules.items():
        for target, at_top in _imports(name, path, modules):
            if _level(target) > _level(name):
                upward.append(f"{name} imports {target}")
            if at_top:
                graph.setdefault(name, set()).add(target)
    assert not upward, "imports going up the pipeline:\n" + "\n".join(upward)

    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if not state.get(nxt):
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in sorted(modules):
        if not state.get(name):
            visit(name, [name])


def test_nothing_heavy_at_import(tmp_path):
    """The command line loads neither torch nor transformers, and importing ODP builds no extension."""
    code = ("import sys, mc2gguf.cli, mc2gguf.odp; "
            "print(sorted(m for m in ('torch', 'transformers', 'gguf') if m in sys.modules))")
    env = {**os.environ, "MC2GGUF_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    # mc2gguf.odp is torch code: importing it loads torch, but it must not build or load the extension
    assert out.stdout.split() == ["['gguf',", "'torch']"] or out.stdout.strip() == "['gguf', 'torch']", out.stdout
    assert not (tmp_path / "cache").exists(), "importing mc2gguf.odp built or looked for the extension"
    cli_only = subprocess.run([sys.executable, "-c", "import sys, mc2gguf.cli; print('torch' in sys.modules, "
                               "'transformers' in sys.modules)"], env=env, capture_output=True, text=True, check=True)
    assert cli_only.stdout.split() == ["False", "False"]
