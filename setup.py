"""Build hooks; all metadata lives in pyproject.toml.

1. The ODP op (``cpp_ext/``, docs/odp.md) is compiled here as ``mc2gguf._odp_C`` only when torch is
   importable in the build environment, i.e. ``pip install --no-build-isolation`` into an environment that
   already has torch. Under pip's default build isolation it is not (the build requirements are setuptools
   alone on purpose: asking for torch there would install a second, CUDA, torch from PyPI), and
   ``mc2gguf.odp`` JIT-builds the same sources against the installed torch at first import instead.
   ``MC2GGUF_BUILD_EXT=0`` skips the install-time build.
2. Non-editable builds ship ``cpp_ext/`` inside the package as ``mc2gguf/_cpp_ext`` so that the JIT build
   works from a wheel too.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
CPP_EXT = HERE / "cpp_ext"


class BuildPyWithOpSources(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False) or not CPP_EXT.is_dir():
            return  # an editable install reads cpp_ext/ from the checkout
        dest = Path(self.build_lib) / "mc2gguf" / "_cpp_ext"
        dest.mkdir(parents=True, exist_ok=True)
        for src in CPP_EXT.iterdir():
            if src.suffix in (".cpp", ".cu", ".h"):
                shutil.copy2(src, dest / src.name)


def odp_extension():
    if os.environ.get("MC2GGUF_BUILD_EXT", "auto") == "0":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # isolated build environment: mc2gguf.odp builds it at first import
        return [], {}
    sources = ["cpp_ext/odp.cpp"]
    kind = cpp_extension.CppExtension
    if torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and os.environ.get("MC2GGUF_ODP_CUDA", "1") != "0":
        sources.append("cpp_ext/odp_cuda.cu")
        kind = cpp_extension.CUDAExtension
    ext = kind(
        "mc2gguf._odp_C",
        sources,
        include_dirs=[str(CPP_EXT)],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = odp_extension()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithOpSources, **cmdclass})
