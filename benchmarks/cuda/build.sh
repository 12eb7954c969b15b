#!/bin/bash
# On the GPU machine: build the patched llama.cpp with CUDA for its own architecture (ninja: a second call resumes).
set -euo pipefail
R=$PWD/.gpubuild/llama
mkdir -p $R/src
[ -f $R/src/CMakeLists.txt ] || tar xzf .gpu/llama-src.tar.gz -C $R/src
nvcc --version | tail -2; nvidia-smi -L
[ -f $R/build/build.ninja ] || cmake -S $R/src -B $R/build -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
  -DGGML_NATIVE=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_BUILD_TESTS=ON \
  -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCH:-native} > $OUT/cmake.log 2>&1
time cmake --build $R/build -j $(nproc) --target llama-cli llama-completion llama-server llama-perplexity llama-bench \
  test-backend-ops test-mul-mat-id-skip llama ggml ggml-base ggml-cpu ggml-cuda > $OUT/build.log 2>&1 || { tail -30 $OUT/build.log; exit 1; }
