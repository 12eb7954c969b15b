#!/bin/bash
# On the GPU machine, after build.sh: test-backend-ops MUL_MAT_ID and test-mul-mat-id-skip on CUDA, the MoE
# patch tests (tests/test_llama_moe.py) through the CUDA build (all layers offloaded), then speed.py.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MC2GGUF_LLAMA_BUILD=$PWD/.gpubuild/llama MC2GGUF_ODP_BACKEND=torch
R=$MC2GGUF_LLAMA_BUILD; rm -rf $R/python && cp -r .gpu/python $R/python && date > $R/complete
# convert needs the pinned source (convert_hf_to_gguf.py) where llama_source() looks for it
export MC2GGUF_CACHE=/tmp/mc2cache; key=$(python3 -c "from mc2gguf.llama.build import _build_location, BuildConfig; print(_build_location(BuildConfig()).root.name)")
mkdir -p $MC2GGUF_CACHE/$key && ln -sfn $R/src $MC2GGUF_CACHE/$key/src
mkdir -p ../shared/tokenizers && cp -r .gpu/tok512 ../shared/tokenizers/
B=$R/build/bin
echo "== test-backend-ops -b CUDA0 -o MUL_MAT_ID"; $B/test-backend-ops -b CUDA0 -o MUL_MAT_ID > $OUT/tbo.log 2>&1; echo "rc=$?"
sed 's/\x1b\[[0-9;]*m//g' $OUT/tbo.log | grep -E "FAIL|tests passed|Backend" | tail -4
echo "== test-mul-mat-id-skip"; $B/test-mul-mat-id-skip 2>&1 | tail -4
echo "== pytest tests/test_llama_moe.py (not the unpatched-build comparisons: no sdist offline)"
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_llama_moe.py -k "not unpatched" 2>&1 | tee $OUT/pytest.log | tail -8
echo "== speed"; timeout 300 python3 benchmarks/cuda/speed.py 2>&1 | grep -v "convert:" | tail -20
