"""``mc2gguf bench``: mc2gguf against llama.cpp's own recipes on one MoE checkpoint (any supported family),
measured in one run.

Every row is a GGUF file of the same model, evaluated by one llama-perplexity run on the evaluation text
against the logits of the f16 file (``--kl-divergence-base``): perplexity, mean KL divergence and the rate
of equal top tokens. Rows: f16; llama.cpp types quantized with an imatrix computed by llama-imatrix on the
same calibration text; a llama.cpp layer mix at each of mc2gguf's sizes (the pinned llama-quantize has no
``--target-bpw``: each layer's experts take the lower or the higher of the two ladder types around the
target, as many layers the higher as the budget allows); mc2gguf's PMQ at each experts' bits per weight and
layout, each with ODP off and on, and for one of them ODP with its thresholds mu scaled (the pinned llama.cpp reads
mu only from the file, so each scale is a copy of the file with other mu). Speed comes from llama-bench,
conversion cost from the wall time and peak RSS of each stage's process.

Each stage leaves its output in the work directory and is skipped when the output exists, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .text import documents
from .errors import Mc2ggufError
from .gguf.writer import KeyValue, copy_with_metadata, read_metadata
from .gguf.inspect import summarize
from .gguf.keys import Keys, expert_tensor_pattern
from .llama.build import find_llama_build
from .quant.types import DEFAULT_PALETTE, quant_type

LLAMA_TYPES = ("Q2_K", "Q2_K_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "Q3_K_S")
# expert types of the llama.cpp layer mix, in increasing bits per weight (each one that llama.cpp's CUDA backend runs)
MIX_LADDER = ("IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K", "IQ3_XXS", "Q3_K", "Q4_K")


@dataclass(frozen=True)
class BenchConfig:
    model: Path
    work: Path
    calib: tuple[Path, ...]
    eval_text: Path
    ctx: int = 512
    chunks: int = 16  # -1: the whole evaluation text
    threads: int = 2
    seed: int = 0
    llama_types: tuple[str, ...] = LLAMA_TYPES
    bpws: tuple[float, ...] = (2.0, 2.5, 3.0)
    layouts: tuple[str, ...] = ("mixed", "stock")
    nsamples: int = 64
    seqlen: int = 512
    eps_tokens: int = 1024  # routed tokens per expert on which PMQ measures eps (convert's default: 4096)
    speed: bool = True
    mu_scales: tuple[float, ...] = (0.5, 0.75, 1.25, 1.5)  # ODP sweep of the middle budget's first layout
    #: --min-speed rows at the middle budget's first layout (the experts' decode speed relative to all-Q4_K
    #: experts, by this machine's measured type costs): quality against speed at one size
    min_speeds: tuple[float, ...] = ()


@dataclass
class Cost:
    seconds: float
    peak_rss: int  # bytes


@dataclass
class Row:
    method: str  # f16 | llama.cpp | llama.cpp mix | mc2gguf
    name: str
    file: str
    size: int
    expert_bpw: float
    odp: bool = False
    ppl: float = 0.0
    ppl_err: float = 0.0
    kld: float | None = None
    same_top: float | None = None  # percent
    skip_ratio: float | None = None
    mu_scale: float = 1.0  # ODP's thresholds, relative to the calibrated ones
    cost: dict[str, Cost] = field(default_factory=dict)


# Linux carries a process's peak RSS (ru_maxrss) across fork and exec, so a stage started from this process would
# report at least this process's own RSS. The stage is therefore started from a small Python process, and its
# peak read there from the stage's own rusage.
_PEAK_RSS_RUNNER = (
    "import resource, subprocess, sys\n"
    "code = subprocess.call(sys.argv[2:])\n"
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024))\n"
    "sys.exit(code)\n"
)


def _run(cmd: list, log: Path, stdout: Path | None = None) -> tuple[str, Cost]:
    """Run ``cmd`` (output to ``log``; standard output to ``stdout`` instead, if given), return the log and its
    wall time and peak RSS; fail clearly."""
    peak_file = log.with_suffix(".peak-rss")
    start = time.monotonic()
    with open(log, "w") as err, open(stdout or os.devnull, "w") as out:
        proc = subprocess.run([sys.executable, "-c", _PEAK_RSS_RUNNER, str(peak_file), *(str(c) for c in cmd)],
                              stdout=out if stdout else err, stderr=err)
    seconds = time.monotonic() - start
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(text.splitlines()[-20:])
        raise Mc2ggufError(f"{Path(str(cmd[0])).name} failed ({proc.returncode}), see {log}:\n{tail}")
    peak = int(peak_file.read_text())
    peak_file.unlink()
    return text, Cost(seconds, peak)


# The options that shape the quantized files (and the imatrix): a work directory holds files of one setting.
_FILE_OPTIONS = ("model", "calib", "ctx", "seed", "nsamples", "seqlen", "eps_tokens")


class Bench:
    def __init__(self, config: BenchConfig):
        self.c = config
        self.bin = find_llama_build().bin_dir
        config.work.mkdir(parents=True, exist_ok=True)
        self._check_work_options()
        # evaluations depend on the evaluation settings too: one directory per setting, so other chunk counts
        # evaluate again instead of reusing logs
        self.eval_dir = config.work / f"eval-ctx{config.ctx}-chunks{config.chunks}"
        self.eval_dir.mkdir(exist_ok=True)
        self.costs_file = config.work / "costs.json"
        self.costs: dict[str, dict] = json.loads(self.costs_file.read_text()) if self.costs_file.exists() else {}

    def _check_work_options(self) -> None:
        stamp = self.c.work / "bench-options.json"
        options = {k: str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, tuple) else v
                   for k, v in asdict(self.c).items() if k in _FILE_OPTIONS}
        if stamp.exists() and json.loads(stamp.read_text()) != options:
            raise Mc2ggufError(f"{self.c.work} holds files made with other options ({stamp.name}: "
                               f"{stamp.read_text().strip()}); choose another --work")
        stamp.write_text(json.dumps(options, indent=1))

    # --- stages: each makes one file once --------------------------------------------------------------

    def _record(self, log: Path, cost: Cost) -> None:
        """Keep a stage's cost under its log's path in the work directory (evaluations: under their setting's
        directory)."""
        self.costs[str(log.relative_to(self.c.work).with_suffix(""))] = asdict(cost)
        self.costs_file.write_text(json.dumps(self.costs, indent=1))

    def _stage(self, key: str, out: Path, cmd: list) -> Cost:
        if not out.exists():
            print(f"[bench] {key}", file=sys.stderr, flush=True)
            log = self.c.work / f"{key}.log"
            self._record(log, _run(cmd, log)[1])
        return Cost(**self.costs[key]) if key in self.costs else Cost(0.0, 0)

    def _mc2gguf(self, *args) -> list:
        return [sys.executable, "-m", "mc2gguf.cli", *args]

    def f16(self) -> Path:
        out = self.c.work / "f16.gguf"
        self._stage("convert-f16", out, self._mc2gguf("convert", self.c.model, out, "--type", "F16"))
        return out

    def calibration_text(self) -> Path:
        out = self.c.work / "calibration.txt"
        if not out.exists():
            out.write_text("\n\n".join(d for path in self.c.calib for d in documents(path)))
        return out

    def imatrix(self) -> Path:
        out = self.c.work / "imatrix.gguf"
        n_chunks = max(1, self.c.nsamples * self.c.seqlen // self.c.ctx)
        self._stage("imatrix", out, [self.bin / "llama-imatrix", "-m", self.f16(), "-f", self.calibration_text(),
                                     "-o", out, "-c", self.c.ctx, "--chunks", n_chunks, "-t", self.c.threads])
        return out

    def llama_quant(self, qtype: str) -> Path:
        out = self.c.work / f"llama-{qtype}.gguf"
        self._stage(f"quantize-{qtype}", out, [self.bin / "llama-quantize", "--imatrix", self.imatrix(), self.f16(),
                                               out, qtype, self.c.threads])
        return out

    def llama_mix(self, bpw: float, n_layers: int) -> Path:
        """Experts of the first k layers at the ladder type above ``bpw``, the others at the one below."""
        ladder = [(name, quant_type(name).bits_per_weight) for name in MIX_LADDER]
        lower = max((t for t in ladder if t[1] <= bpw), key=lambda t: t[1], default=ladder[0])
        upper = min((t for t in ladder if t[1] >= bpw), key=lambda t: t[1], default=ladder[-1])
        share = 0.0 if upper[1] == lower[1] else (bpw - lower[1]) / (upper[1] - lower[1])
        k = int(share * n_layers + 1e-9)  # as many layers at the upper type as fit in the budget
        out = self.c.work / f"llama-mix-{bpw:.2f}.gguf"
        overrides = [a for i in range(k) for a in ("--tensor-type", f"{expert_tensor_pattern(i)}={upper[0]}")]
        self._stage(f"quantize-mix-{bpw:.2f}", out, [self.bin / "llama-quantize", "--imatrix", self.imatrix(),
                                                     *overrides, "--tensor-type", "attn_.*=Q4_K", self.f16(), out,
                                                     lower[0], self.c.threads])
        return out

    def type_costs(self) -> Path:
        out = self.c.work / "type-costs.json"
        self._stage("type-costs", out, self._mc2gguf("type-costs", "--types", ",".join(DEFAULT_PALETTE), "--threads",
                                                     self.c.threads, "--out", out))
        return out

    def pmq(self, bpw: float, layout: str, min_speed: float | None = None) -> Path:
        tag = f"{bpw:.2f}-{layout}" + (f"-speed{min_speed:g}" if min_speed else "")
        out = self.c.work / f"mc2gguf-{tag}.gguf"
        calib = [a for path in self.c.calib for a in ("--calib", path)]
        speed = ["--min-speed", min_speed, "--type-costs", self.type_costs(), "--speed-threads", self.c.threads] \
            if min_speed else []
        self._stage(f"pmq-{tag}", out, self._mc2gguf(
            "convert", self.c.model, out, "--bpw", bpw, "--layout", layout, *calib, "--nsamples", self.c.nsamples,
            "--seqlen", self.c.seqlen, "--eps-tokens", self.c.eps_tokens, "--seed", self.c.seed, *speed,
            "--work-dir", self.c.work / "pmq-work"))  # measured once
        return out

    def scaled_mu(self, path: Path, scale: float) -> Path:
        """A copy of ``path`` whose ODP thresholds are ``scale`` times the calibrated ones (at most 1)."""
        out = self.c.work / f"{path.stem}-mu{scale:g}.gguf"
        if not out.exists():
            mu = next(kv for kv in read_metadata(path) if kv.key == Keys.ODP_MU)
            copy_with_metadata(path, out, {Keys.ODP_MU: KeyValue(Keys.ODP_MU, [min(1.0, m * scale) for m in mu.value],
                                                            mu.vtype, mu.sub_type)})
        return out

    # --- evaluation --------------------------------------------------------------------------------------

    def _perplexity_args(self) -> list:
        return ["-f", self.c.eval_text, "-c", self.c.ctx, "--chunks", self.c.chunks, "-t", self.c.threads]

    def kld_base(self) -> tuple[Path, float, float]:
        base = self.eval_dir / "f16.kld"
        log = self.eval_dir / "ppl-f16.log"
        if not base.exists() or not log.exists():
            self._record(log, _run([self.bin / "llama-perplexity", "-m", self.f16(), *self._perplexity_args(),
                                    "--kl-divergence-base", base], log)[1])
        ppl, err = _parse_float_pair(log.read_text(errors="replace"), r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)")
        return base, ppl, err

    def evaluate(self, row: Row, prune: bool | None = None) -> Row:
        base, _, _ = self.kld_base()
        tag = Path(row.file).stem + ("" if prune is None else f"-odp-{'on' if prune else 'off'}")
        log = self.eval_dir / f"ppl-{tag}.log"
        if not log.exists() or "Same top p" not in log.read_text(errors="replace"):
            switch = [] if prune is None else ["--moe-prune", "on" if prune else "off"]
            self._record(log, _run([self.bin / "llama-perplexity", "-m", row.file, *self._perplexity_args(),
                                    "--kl-divergence-base", base, "--kl-divergence", *switch], log)[1])
        text = log.read_text(errors="replace")
        row.ppl, row.ppl_err = _parse_float_pair(text, r"Mean PPL\(Q\)\s*:\s*([\d.]+)\s*±\s*([\d.]+)")
        row.kld = _parse_float_pair(text, r"Mean\s+KLD:\s*([-\d.]+)\s*±\s*([\d.]+)")[0]
        row.same_top = _parse_float_pair(text, r"Same top p:\s*([\d.]+)\s*±\s*([\d.]+)")[0]
        pruned = re.search(r"MoE pruned slots =\s*(\d+) / (\d+)", text)
        row.skip_ratio = int(pruned[1]) / int(pruned[2]) if pruned and int(pruned[2]) else (0.0 if prune else None)
        row.odp = bool(prune)
        return row

    def speed(self, files: list[Path], prune_sweep: bool) -> list[dict]:
        log = self.c.work / f"bench-{'odp' if prune_sweep else 'plain'}.json"
        if not log.exists() or not log.read_text().strip().endswith("]"):
            print(f"[bench] llama-bench {log.stem}", file=sys.stderr, flush=True)
            cmd = [self.bin / "llama-bench", "-m", ",".join(str(f) for f in files), "-t", self.c.threads,
                   "-p", 512, "-n", 128, "-r", 3, "-o", "json", *(["--moe-prune", "0,1"] if prune_sweep else [])]
            self._record(log, _run(cmd, log.with_suffix(".log"), stdout=log)[1])
        return [{"file": Path(r["model_filename"]).name, "test": f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}",
                 "moe_prune": r["moe_prune"] if prune_sweep else None, "moe_pruned": r["moe_pruned"],
                 "tokens_per_second": r["avg_ts"], "stddev": r["stddev_ts"]} for r in json.loads(log.read_text())]

    # --- the whole run -----------------------------------------------------------------------------------

    def _row(self, method: str, name: str, path: Path, *cost_keys: str) -> Row:
        summary = summarize(path)
        cost = {k: Cost(**self.costs[k]) for k in cost_keys if k in self.costs}
        return Row(method, name, str(path), summary.size, summary.bits_per_weight(summary.expert_tensors), cost=cost)

    def run(self) -> dict:
        started = time.monotonic()
        f16 = self.f16()
        n_layers = max(int(m[1]) for t in summarize(f16).expert_tensors if (m := re.match(r"blk\.(\d+)\.", t.name))) + 1
        _, f16_ppl, f16_err = self.kld_base()
        rows = [Row("f16", "f16", str(f16), f16.stat().st_size,
                    summarize(f16).bits_per_weight(summarize(f16).expert_tensors), ppl=f16_ppl, ppl_err=f16_err,
                    kld=0.0, same_top=100.0, cost={"convert-f16": Cost(**self.costs["convert-f16"])}
                    if "convert-f16" in self.costs else {})]
        for qtype in self.c.llama_types:
            rows.append(self.evaluate(self._row("llama.cpp", f"{qtype} + imatrix", self.llama_quant(qtype),
                                                "imatrix", f"quantize-{qtype}")))
        for bpw in self.c.bpws:
            rows.append(self.evaluate(self._row("llama.cpp mix", f"layer mix @ {bpw:.2f}",
                                                self.llama_mix(bpw, n_layers), "imatrix", f"quantize-mix-{bpw:.2f}")))
        pmq_files = []
        for bpw in self.c.bpws:
            for layout in self.c.layouts:
                path = self.pmq(bpw, layout)
                pmq_files.append(path)
                for prune in (False, True):
                    rows.append(self.evaluate(self._row("mc2gguf", f"PMQ {bpw:.2f} {layout}", path,
                                                        f"pmq-{bpw:.2f}-{layout}"), prune))
                if self.c.layouts.index(layout) == 0 and bpw == self.c.bpws[len(self.c.bpws) // 2]:
                    for min_speed in self.c.min_speeds:
                        fast = self.pmq(bpw, layout, min_speed)
                        pmq_files.append(fast)
                        for prune in (False, True):
                            rows.append(self.evaluate(self._row(
                                "mc2gguf", f"PMQ {bpw:.2f} {layout} --min-speed {min_speed:g}", fast,
                                f"pmq-{bpw:.2f}-{layout}-speed{min_speed:g}"), prune))
                    for scale in self.c.mu_scales:
                        row = self._row("mc2gguf", f"PMQ {bpw:.2f} {layout}", self.scaled_mu(path, scale))
                        row.mu_scale = scale
                        rows.append(self.evaluate(row, True))
        speed = []
        if self.c.speed:
            others = [f16] + _best_llama_files(rows)
            speed = self.speed(others, prune_sweep=False) + (self.speed(pmq_files, prune_sweep=True) if pmq_files else [])
        results = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": _git_commit(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.c).items()},
            "rows": [asdict(r) for r in rows], "speed": speed,
            "seconds": {"stages": sum(c["seconds"] for k, c in self.costs.items()
                                      if not k.startswith("eval-") or k.startswith(f"{self.eval_dir.name}/")),
                        "this_run": time.monotonic() - started},
        }
        (self.c.work / "results.json").write_text(json.dumps(results, indent=1, default=str))
        (self.c.work / "results.md").write_text(render_markdown(results))
        plot(results, self.c.work)
        return results


def _parse_float_pair(text: str, pattern: str) -> tuple[float, float]:
    found = re.findall(pattern, text)
    if not found:
        raise Mc2ggufError(f"llama-perplexity's output has no line matching {pattern!r}")
    return float(found[-1][0]), float(found[-1][1])


def _best_llama_files(rows: list[Row]) -> list[Path]:
    """For each mc2gguf file, the llama.cpp file of lowest KLD among those within 5 % of its size (llama-bench
    compares speed at equal size; the single-type files outside every mc2gguf size are not timed)."""
    best = []
    for pmq in (r for r in rows if r.method == "mc2gguf" and not r.odp):
        near = [r for r in rows if r.method.startswith("llama.cpp") and abs(r.size - pmq.size) <= 0.05 * pmq.size]
        if near:
            path = Path(min(near, key=lambda r: r.kld).file)
            best += [] if path in best else [path]
    return best


def _git_commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent)
    return proc.stdout.strip() or "unknown"


def _equal_size_note(row: dict, rows: list[dict]) -> str:
    """How far the nearest llama.cpp row is in size, where it is more than 1 % away."""
    others = [r for r in rows if r["method"].startswith("llama.cpp")]
    if row["method"] != "mc2gguf" or not others:
        return ""
    nearest = min(others, key=lambda r: abs(r["size"] - row["size"]))
    off = 100.0 * (row["size"] - nearest["size"]) / nearest["size"]
    return "" if abs(off) <= 1.0 else f"{off:+.1f} % vs {nearest['name']}"


def render_markdown(results: dict) -> str:
    rows = results["rows"]
    lines = [f"Measured {results['date']}, commit {results['commit']}, {results['machine']}; "
             f"evaluation: ctx {results['config']['ctx']}, chunks {results['config']['chunks']}.", "",
             "| method | file | size (MiB) | experts bpw | ODP | skip | PPL | mean KLD | same top % | size vs nearest llama.cpp |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        skip = f"{100 * r['skip_ratio']:.1f} %" if r["skip_ratio"] is not None else ""
        odp = ("on" + ("" if r["mu_scale"] == 1.0 else f", mu x{r['mu_scale']:g}")) if r["odp"] else "off"
        kld = f"{r['kld']:.4f}" if r["kld"] is not None else ""
        top = f"{r['same_top']:.2f}" if r["same_top"] is not None else ""
        lines.append(f"| {r['method']} | {r['name']} | {r['size'] / 2**20:.2f} | {r['expert_bpw']:.3f} | "
                     f"{odp} | {skip} | {r['ppl']:.3f} ± {r['ppl_err']:.3f} | {kld} | {top} | "
                     f"{_equal_size_note(r, rows)} |")
    if results["speed"]:
        lines += ["", "| file | test | ODP | pruned | tokens/s |", "|---|---|---|---:|---:|"]
        for s in results["speed"]:
            odp = "" if s["moe_prune"] is None else "on" if s["moe_prune"] else "off"
            lines.append(f"| {s['file']} | {s['test']} | {odp} | "
                         f"{100 * s['moe_pruned']:.1f} % | {s['tokens_per_second']:.2f} ± {s['stddev']:.2f} |")
    if "seconds" in results:
        lines += ["", f"Time on this machine: {results['seconds']['stages'] / 60:.1f} min summed over every stage of "
                      f"the results (files, evaluations, llama-bench; each stage's cost is kept when a run resumes); "
                      f"this invocation {results['seconds']['this_run'] / 60:.1f} min."]
    costs = {(r["name"], k): v for r in rows for k, v in r["cost"].items()}
    if costs:
        lines += ["", "| stage | for | wall time (s) | peak RSS (MiB) |", "|---|---|---:|---:|"]
        for (name, stage), c in sorted(costs.items(), key=lambda kv: kv[0][1]):
            lines.append(f"| {stage} | {name} | {c['seconds']:.1f} | {c['peak_rss'] / 2**20:.0f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if not r["odp"]]
    for metric, label in (("ppl", "perplexity"), ("kld", "mean KL divergence vs f16")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for method, marker in (("llama.cpp", "o"), ("llama.cpp mix", "s"), ("mc2gguf", "^")):
            pts = sorted((r["size"] / 2**20, r[metric]) for r in rows if r["method"] == method)
            if pts:
                ax.plot(*zip(*pts), marker=marker, linestyle="" if method == "llama.cpp" else "-", label=method)
        ax.set_xlabel("file size (MiB)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / f"{metric}_vs_size.png", dpi=120)
        plt.close(fig)
    off = {r["name"]: r for r in results["rows"] if r["method"] == "mc2gguf" and not r["odp"]}
    curves: dict[str, list] = {}
    for r in results["rows"]:
        if r["method"] == "mc2gguf" and r["odp"] and r["name"] in off:
            curves.setdefault(r["name"], []).append(
                (100 * r["skip_ratio"], 100 * (r["ppl"] / off[r["name"]]["ppl"] - 1), r["mu_scale"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in curves.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="-" if len(pts) > 1 else "", label=name)
        for x, y, scale in pts if len(pts) > 1 else []:
            ax.annotate(f"mu x{scale:g}", (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("second-expert slots skipped (%)")
    ax.set_ylabel("perplexity change vs ODP off (%)")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "odp_tradeoff.png", dpi=120)
    plt.close(fig)


README_BEGIN, README_END = "<!-- bench results: begin -->", "<!-- bench results: end -->"


def update_readme(readme: Path, work: Path) -> None:
    """Replace the README's results section (between the two markers) with this run's table and plots."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise Mc2ggufError(f"{readme} has no results section ({README_BEGIN} ... {README_END})")
    plots = [p for p in ("ppl_vs_size.png", "kld_vs_size.png", "odp_tradeoff.png") if (work / p).exists()]
    rel = os.path.relpath(work, readme.parent)
    body = (work / "results.md").read_text() + "".join(f"\n![{p}]({rel}/{p})" for p in plots)
    head, rest = text.split(README_BEGIN, 1)
    readme.write_text(head + README_BEGIN + "\n" + body + "\n" + README_END + rest.split(README_END, 1)[1])
