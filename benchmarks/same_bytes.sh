#!/usr/bin/env bash
# Byte-identity of two checkouts' outputs (for refactors): PMQ files of a seeded tiny Mixtral (mixed, stock from
# a shared --work-dir, sequential, one type) and of a reference-MoE directory, written by each checkout, then cmp;
# where they differ, benchmarks/compare_gguf.py says which tensors and keys.
#   benchmarks/same_bytes.sh OLD_CHECKOUT NEW_CHECKOUT REFERENCE_MOE_DIR OUT_DIR
# Needs `mc2gguf build-llama` (codebook types) and ../shared beside the checkouts. About 10 min per checkout
# on 2 cores, most of it the reference MoE.
set -euo pipefail
old=$(realpath "$1"); new=$(realpath "$2"); ref=$(realpath "$3"); out=$(realpath -m "$4")
shared=$(realpath "$new/../shared"); c4=$shared/data/c4/c4-sample.jsonl; ts=$shared/data/tinystories/tinystories-2MiB.txt
mkdir -p "$out"
tiny=$out/tiny-model
if [ ! -f "$tiny/config.json" ]; then
  PYTHONPATH=$new python3 -c "
from pathlib import Path
from mc2gguf.testmodel import TinyMixtralConfig, build_tiny_mixtral
build_tiny_mixtral(Path('$tiny'), Path('$shared/tokenizers/tok512/tokenizer.model'), seed=0,
                   config=TinyMixtralConfig(num_hidden_layers=3, num_local_experts=8))"
fi
for side in old new; do
  code=${!side}; dir=$out/$side; mkdir -p "$dir"
  run() { (cd "$code" && PYTHONPATH=$code python3 -m mc2gguf.cli convert "$@" --force); }
  run "$tiny" "$dir/tiny-2.5.gguf" --bpw 2.5 --calib "$c4" --nsamples 16 --seqlen 256 --work-dir "$dir/tiny-work"
  run "$tiny" "$dir/tiny-3.0-stock.gguf" --bpw 3.0 --layout stock --calib "$c4" --nsamples 16 --seqlen 256 \
      --work-dir "$dir/tiny-work"
  run "$tiny" "$dir/tiny-seq.gguf" --bpw 2.5 --sequential --calib "$c4" --calib "$ts" --nsamples 8 --seqlen 256 \
      --palette Q2_K,IQ2_XXS,Q4_K
  run "$tiny" "$dir/tiny-q4k.gguf" --type Q4_K
  run "$ref" "$dir/ref-2.5.gguf" --bpw 2.5 --calib "$c4" --nsamples 8 --seqlen 512 --palette IQ2_XXS,Q2_K,Q4_K \
      --eps-tokens 512 --work-dir "$dir/ref-work"
done
status=0
for f in tiny-2.5.gguf tiny-3.0-stock.gguf tiny-seq.gguf tiny-q4k.gguf ref-2.5.gguf; do
  if cmp -s "$out/old/$f" "$out/new/$f"; then echo "same bytes: $f"
  else echo "differ: $f"; python3 "$new/benchmarks/compare_gguf.py" "$out/old/$f" "$out/new/$f"; status=1; fi
done
exit $status
