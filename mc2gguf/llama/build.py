"""Reproducible, cached build of the pinned llama.cpp with the project's patches.

The pinned source is the llama.cpp tree vendored by PyPI ``llama-cpp-python==0.3.36`` (llama.cpp commit
0c1e570). The build lives in a cache directory keyed by the source version, the patch series and the build
options, so a second call with the same inputs returns at once.
"""

from __future__ import annotations

import ctypes.util
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import Mc2ggufError
from ..paths import cache_root

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"

PATCH_DIR = Path(__file__).resolve().parents[2] / "patches"

TOOL_TARGETS = (
    "llama-cli",
    "llama-completion",
    "llama-server",
    "llama-perplexity",
    "llama-quantize",
    "llama-imatrix",
    "llama-bench",
    "test-backend-ops",
    "test-mul-mat-id-skip",
    "test-moe-fused",
)
LIBRARY_TARGETS = ("llama", "ggml", "ggml-base", "ggml-cpu")

# Portable: no -march=native, no network at configure time (the web UI would be downloaded otherwise).
BASE_CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DGGML_NATIVE=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_BUILD_TESTS=ON",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
)
CUDA_CMAKE_FLAGS = ("-DGGML_CUDA=ON",)
DEFAULT_CUDA_ARCHS = "86;89"


@dataclass(frozen=True)
class BuildConfig:
    cuda: bool = False
    cuda_archs: str = DEFAULT_CUDA_ARCHS
    patches: tuple[Path, ...] = field(default_factory=lambda: tuple(sorted(PATCH_DIR.glob("*.patch"))))
    # the tools built besides the shared libraries (and the Python bindings); none for a reference build
    tools: tuple[str, ...] = TOOL_TARGETS

    @classmethod
    def unpatched(cls, tools: tuple[str, ...] = ()) -> "BuildConfig":
        """The pinned llama.cpp without the patch series: libraries only (the tests' bit-exact reference), or
        with some stock tools (``mc2gguf bench-speed --unpatched``: llama-bench)."""
        return cls(patches=(), tools=tools)

    def targets(self) -> tuple[str, ...]:
        return (*self.tools, *LIBRARY_TARGETS)

    def cmake_flags(self) -> list[str]:
        flags = list(BASE_CMAKE_FLAGS)
        if self.cuda:
            flags += [*CUDA_CMAKE_FLAGS, f"-DCMAKE_CUDA_ARCHITECTURES={self.cuda_archs}"]
        return flags

    def key(self) -> str:
        digest = hashlib.sha256()
        digest.update(f"{LLAMA_CPP_PYTHON_VERSION}\0{' '.join(self.cmake_flags())}\0".encode())
        for patch in self.patches:
            digest.update(patch.name.encode() + b"\0" + patch.read_bytes() + b"\0")
        if not self.tools:
            digest.update(b"libraries-only\0")
        elif self.tools != TOOL_TARGETS:
            digest.update(("tools\0" + "\0".join(self.tools) + "\0").encode())
        return digest.hexdigest()[:12]


@dataclass(frozen=True)
class LlamaBuild:
    root: Path

    @property
    def source_dir(self) -> Path:
        return self.root / "src"

    @property
    def build_dir(self) -> Path:
        return self.root / "build"

    @property
    def bin_dir(self) -> Path:
        return self.build_dir / "bin"

    @property
    def stamp(self) -> Path:
        return self.root / "complete"

    def binary(self, name: str) -> Path:
        path = self.bin_dir / name
        if not path.exists():
            raise Mc2ggufError(f"{name} is missing from the llama.cpp build at {self.bin_dir}")
        return path

    @property
    def python_dir(self) -> Path:
        """Where the llama-cpp-python bindings for this build are installed (see ``install_bindings``)."""
        return self.root / "python"

    @property
    def ggml_library(self) -> Path:
        return self.bin_dir / "libggml-base.so"


def _note(message: str) -> None:
    """A progress line on stderr (stdout carries the command's result, e.g. the bin directory)."""
    print(message, file=sys.stderr, flush=True)


def _quiet(line: str) -> None:
    return None


def _pip_line(line: str) -> str | None:
    """pip's own lines (compact when stdout is not a terminal), indented; blank lines dropped."""
    return "  " + line if line.strip() else None


_MAKE_PROGRESS = re.compile(r"\[\s*(\d+)%\]\s+(.*)")  # Unix Makefiles: "[ 43%] Building CXX object ..."
_NINJA_PROGRESS = re.compile(r"\[(\d+)/(\d+)\]\s+(.*)")  # Ninja: "[12/345] Building CXX object ..."
_OBJECT = re.compile(r"Building (?:\w+) object (\S+)")


class BuildProgress:
    """Turns ``cmake --build`` output into a compact progress on stderr: one line each time the percentage
    rises (the source being compiled), every link and every finished target; compiler output and the
    other lines only go to the log. Call it with each line; it returns the line to show, or None."""

    def __init__(self) -> None:
        self.percent = -1

    def __call__(self, line: str) -> str | None:
        line = line.rstrip()
        match = _MAKE_PROGRESS.match(line)
        if match:
            percent, what = int(match[1]), match[2]
        else:
            match = _NINJA_PROGRESS.match(line)
            if match:
                percent, what = 100 * int(match[1]) // max(int(match[2]), 1), match[3]
            else:
                match = _OBJECT.match(line)  # a single object built with make (the CUDA compile check)
                return f"  compiling {_source_name(match[1])}" if match else None
        shown = f"[{percent:3d}%] "
        obj = _OBJECT.match(what)
        if obj:
            if percent <= self.percent:
                return None
            self.percent = percent
            return shown + "compiling " + _source_name(obj[1])
        self.percent = max(self.percent, percent)
        if what.startswith("Linking "):
            return shown + "linking " + Path(what.split()[-1]).name
        if what.startswith("Built target "):
            return shown + what[0].lower() + what[1:]
        return None


def _source_name(obj: str) -> str:
    """``src/CMakeFiles/llama.dir/llama-model.cpp.o`` -> ``llama-model.cpp``."""
    name = Path(obj).name
    return name[:-2] if name.endswith(".o") else name


def _run(cmd: list[str], log: Path, cwd: Path | None = None, env: dict | None = None,
         show: Callable[[str], str | None] = _quiet) -> None:
    """Run ``cmd`` with its output appended to ``log``; ``show`` picks, line by line as they come, what is also
    printed to stderr. On failure the error carries the last 40 lines of the log."""
    print("+ " + " ".join(str(c) for c in cmd), file=sys.stderr, flush=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        try:
            for raw in proc.stdout:
                out.write(raw)
                shown = show(raw.decode(errors="replace").rstrip("\r\n"))
                if shown is not None:
                    print(shown, file=sys.stderr, flush=True)
        except BaseException:  # e.g. KeyboardInterrupt: stop the command, as subprocess.run does
            proc.kill()
            raise
        finally:
            proc.stdout.close()
            returncode = proc.wait()
    if returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-40:]
        raise Mc2ggufError(f"command failed ({returncode}): {' '.join(map(str, cmd))}\n" + "\n".join(tail))


def fetch_sdist() -> Path:
    """The llama-cpp-python sdist, downloaded once with pip into the cache."""
    downloads = cache_root() / "downloads"
    sdist = downloads / f"{SDIST_NAME}.tar.gz"
    if sdist.exists():
        return sdist
    downloads.mkdir(parents=True, exist_ok=True)
    _note(f"mc2gguf: downloading the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist (llama.cpp's source) "
          f"into {downloads}")
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", tmp]
        try:
            _run(cmd, Path(tmp) / "pip.log", show=_pip_line)
        except Mc2ggufError as e:
            output = str(e).split("\n", 1)[-1]  # the log's tail, without the "command failed" line
            raise Mc2ggufError(f"could not download llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}:\n{output}") from None
        os.replace(Path(tmp) / sdist.name, sdist)
    return sdist


def _extract_llama_source(sdist: Path, dest: Path) -> None:
    """Extract vendor/llama.cpp from the sdist into dest and check the pinned commit."""
    prefix = f"{SDIST_NAME}/vendor/llama.cpp/"
    head = f"{SDIST_NAME}/.git/modules/vendor/llama.cpp/HEAD"
    _note(f"mc2gguf: extracting llama.cpp from {sdist.name} into {dest}")
    start = time.monotonic()
    with tarfile.open(sdist) as tar:
        commit = tar.extractfile(head).read().decode().strip()
        if commit != LLAMA_CPP_COMMIT:
            raise Mc2ggufError(f"{sdist} vendors llama.cpp {commit}, expected {LLAMA_CPP_COMMIT}")
        members = []
        for member in tar.getmembers():
            if member.name.startswith(prefix) and not member.name.endswith("/.git"):
                member.name = member.name[len(prefix):]
                members.append(member)
        tar.extractall(dest, members=members, filter="data")
    _note(f"mc2gguf: extracted {len(members)} files in {time.monotonic() - start:.0f} s")


def _prepare_source(config: BuildConfig, build: LlamaBuild) -> None:
    if (build.source_dir / "CMakeLists.txt").exists():
        return
    staging = build.root / "src.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    _extract_llama_source(fetch_sdist(), staging)
    for i, patch in enumerate(config.patches, 1):
        _note(f"mc2gguf: applying patch {i}/{len(config.patches)}: {patch.name}")
        _run(["patch", "-p1", "--forward", "--batch", "-i", str(patch)], build.root / "patch.log", cwd=staging)
    os.replace(staging, build.source_dir)


def _build_location(config: BuildConfig) -> LlamaBuild:
    return LlamaBuild(cache_root() / f"llama.cpp-{LLAMA_CPP_COMMIT[:7]}-{config.key()}")


def llama_source(config: BuildConfig | None = None) -> Path:
    """The pinned, patched llama.cpp source tree (downloaded and extracted once; nothing is built)."""
    config = config or BuildConfig()
    build = _build_location(config)
    build.root.mkdir(parents=True, exist_ok=True)
    _prepare_source(config, build)
    return build.source_dir


def build_llama(config: BuildConfig | None = None, jobs: int | None = None) -> LlamaBuild:
    """Build (or find in the cache) the patched llama.cpp and return where it is.

    With ``MC2GGUF_LLAMA_BUILD`` set, that build is used as it is (see ``find_llama_build``).
    """
    config = config or BuildConfig()
    if os.environ.get("MC2GGUF_LLAMA_BUILD") and config.patches == BuildConfig().patches:
        return find_llama_build(config)
    build = _build_location(config)
    if build.stamp.exists():
        return build
    start = time.monotonic()
    _note(f"mc2gguf: building the patched llama.cpp in {build.root} (once; later calls find it there)")
    llama_source(config)
    log = build.root / "build.log"
    _note(f"mc2gguf: configuring with cmake (full output: {log})")
    _run(["cmake", "-S", str(build.source_dir), "-B", str(build.build_dir), *config.cmake_flags()], log)
    jobs = jobs or os.cpu_count() or 1
    _note(f"mc2gguf: compiling with {jobs} job{'s' if jobs != 1 else ''} (minutes; compiler output: {log})")
    _run(["cmake", "--build", str(build.build_dir), "-j", str(jobs),
          "--target", *config.targets()], log, show=BuildProgress())
    _note("mc2gguf: installing the llama-cpp-python bindings against this build")
    _install_bindings(build, log)
    build.stamp.write_text(" ".join(config.cmake_flags()) + "\n")
    _note(f"mc2gguf: llama.cpp built in {(time.monotonic() - start) / 60:.1f} min")
    return build


def patched_cuda_units(patches: tuple[Path, ...]) -> list[str]:
    """The CUDA translation units (``ggml/src/ggml-cuda/*.cu``) that the patch series changes, by name."""
    units = []
    for patch in patches:
        for line in patch.read_text().splitlines():
            if line.startswith("+++ b/ggml/src/ggml-cuda/") and line.endswith(".cu"):
                units.append(Path(line[len("+++ b/"):]).name)
    return sorted(set(units))


def _cublas_cmake_flags() -> list[str]:
    """CMake flags for cuBLAS when the CUDA toolkit of ``nvcc`` lacks it (this project's CI machine does): the
    headers and libraries of the pip package ``nvidia-cublas``. ggml-cuda includes ``cublas_v2.h`` in every
    unit, and CMake's generate step needs the library target even when nothing is linked."""
    import importlib.util

    nvcc = shutil.which("nvcc")
    if nvcc and (Path(nvcc).resolve().parent.parent / "include" / "cublas_v2.h").exists():
        return []
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for include in sorted(Path(root).glob("*/include/cublas_v2.h"), reverse=True):
            lib = include.parent.parent / "lib"
            cublas, cublas_lt = sorted(lib.glob("libcublas.so*")), sorted(lib.glob("libcublasLt.so*"))
            if cublas and cublas_lt:
                return [f"-DCMAKE_CUDA_FLAGS=-I{include.parent}", f"-DCUDA_cublas_LIBRARY={cublas[0]}",
                        f"-DCUDA_cublasLt_LIBRARY={cublas_lt[0]}"]
    raise Mc2ggufError("the CUDA toolkit of nvcc has no cuBLAS (cublas_v2.h): install it, "
                       "e.g. `pip install nvidia-cublas`")


def compile_check_cuda(cuda_archs: str = DEFAULT_CUDA_ARCHS, jobs: int | None = None) -> list[str]:
    """Compile, without linking, the CUDA units the patch series changes, for ``cuda_archs``, with the
    installed nvcc and the flags of a CUDA build; returns the units compiled.

    A full CUDA build takes hours on a 2-core machine without a GPU; this checks the patched kernels in
    about 20 minutes. ``mmid.cuh`` and other changed headers are compiled through the units that include them.
    """
    if shutil.which("nvcc") is None:
        raise Mc2ggufError("nvcc is not on PATH: the CUDA compile check needs the CUDA toolkit")
    config = BuildConfig(cuda=True, cuda_archs=cuda_archs)
    source = llama_source(config)
    check_dir = _build_location(config).root / "compile-check"
    log = _build_location(config).root / "compile-check.log"
    flags = [*config.cmake_flags(), *_cublas_cmake_flags()]
    if ctypes.util.find_library("cuda") is None:
        # no driver library (a machine without a GPU): only the VMM memory pool links libcuda, and the patch
        # series does not touch it
        flags.append("-DGGML_CUDA_NO_VMM=ON")
    _note(f"mc2gguf: configuring the CUDA build with cmake (full output: {log})")
    _run(["cmake", "-S", str(source), "-B", str(check_dir), *flags], log)
    units = patched_cuda_units(config.patches)
    _note(f"mc2gguf: compiling {len(units)} CUDA units for {cuda_archs} (compiler output: {log})")
    _run(["make", "-C", str(check_dir / "ggml" / "src" / "ggml-cuda"), f"-j{jobs or os.cpu_count() or 1}",
          *(f"{unit}.o" for unit in units)], log, show=BuildProgress())
    return units


def _install_bindings(build: LlamaBuild, log: Path) -> None:
    """Install llama-cpp-python's Python package next to the build, compiling nothing.

    With ``LLAMA_BUILD=OFF`` its CMake project builds no library; at run time ``LLAMA_CPP_LIB_PATH`` points
    the bindings at this build's ``libllama.so`` (see ``mc2gguf.llama.runtime``), so Python and the
    command-line tools run the very same patched library.
    """
    env = {**os.environ, "CMAKE_ARGS": "-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF"}
    shutil.rmtree(build.python_dir, ignore_errors=True)
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--target", str(build.python_dir),
          str(fetch_sdist())], log, env=env, show=_pip_line)


def find_llama_build(config: BuildConfig | None = None) -> LlamaBuild:
    """The cached build for this configuration, or a clear error telling the user how to make it.

    ``MC2GGUF_LLAMA_BUILD`` names a build directory root to use instead (e.g. a developer's own build).
    """
    override = os.environ.get("MC2GGUF_LLAMA_BUILD")
    build = LlamaBuild(Path(override)) if override else _build_location(config or BuildConfig())
    if not build.stamp.exists():
        raise Mc2ggufError("the pinned llama.cpp is not built yet: run `mc2gguf build-llama` first")
    return build
