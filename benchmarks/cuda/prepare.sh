#!/bin/bash
# Stage what a GPU machine without network needs in .gpu/ (git-ignored; carried by the device tool):
# the patched llama.cpp source (trimmed), the llama-cpp-python package of the local build, the wheels the
# GPU image lacks and the shared test tokenizer. Run from the repository root after `mc2gguf build-llama`.
set -euo pipefail
build=$(mc2gguf build-llama | tail -1); root=$(dirname "$(dirname "$build")")
mkdir -p .gpu/whl && grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; printf '/.gpu/\n/.gpubuild/\n' >> .git/info/exclude; }
tar czf .gpu/llama-src.tar.gz -C "$root/src" --exclude=./models --exclude=./docs --exclude=./media \
    --exclude=./gguf-py --exclude=./examples --exclude=./benches --exclude=./.git .
rm -rf .gpu/python && cp -r "$root/python" .gpu/python
rm -rf .gpu/tok512 && cp -r ../shared/tokenizers/tok512 .gpu/tok512
version() { python3 -c "import importlib.metadata as m; print(m.version('$1'))"; }
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .gpu/whl \
    "gguf==$(version gguf)" "pulp==$(version pulp)" "highspy==$(version highspy)" diskcache
du -sh .gpu
