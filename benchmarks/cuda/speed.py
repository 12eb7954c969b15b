"""On the GPU machine (benchmarks/cuda/test.sh runs it): a Mixtral-shaped random model (8 layers, hidden 1024,
8 experts of 3584, top-2, Q4_0) with ODP metadata calibrated as the tests' odp_file fixture does, then
llama-bench with pruning off and on, llama-perplexity and llama-completion, all layers on the GPU: the
pruned-slot counter and the speed of both settings, measured on CUDA."""
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, "tests")
from test_llama_moe import random_tokens  # noqa: E402

from mc2gguf.convert import convert  # noqa: E402
from mc2gguf.gguf.edit import odp_kv, rewrite  # noqa: E402
from mc2gguf.llama.runtime import eval_tokens  # noqa: E402
from mc2gguf.odp import calibrate_mu, top2_ratios  # noqa: E402
from mc2gguf.quant.types import quant_type  # noqa: E402
from mc2gguf.testmodel import TinyMixtralConfig, build_tiny_mixtral  # noqa: E402

work = Path("/tmp/speed"); work.mkdir(exist_ok=True)
out = Path(os.environ["OUT"])
cfg = TinyMixtralConfig(hidden_size=1024, intermediate_size=3584, num_hidden_layers=8, num_attention_heads=16,
                        num_key_value_heads=8, num_local_experts=8, max_position_embeddings=4096)
t0 = time.time()
ckpt = work / "ckpt" if (work / "ckpt" / "config.json").exists() else build_tiny_mixtral(work / "ckpt", Path("../shared/tokenizers/tok512/tokenizer.model"), seed=0, config=cfg)
plain = work / "q4_0.gguf"
if not plain.exists():
    convert(ckpt, plain, quant_type("Q4_0"))
print(f"model built and converted in {time.time() - t0:.0f} s", flush=True)
run = eval_tokens(plain, random_tokens(512, seed=1), capture=("ffn_norm", "ffn_moe_logits"))
mu, quantiles = [], []
for il in range(cfg.num_hidden_layers):
    logits = torch.from_numpy(np.concatenate(run["tensors"][f"ffn_moe_logits-{il}"]))
    mu.append(calibrate_mu(top2_ratios(logits)))
    x = torch.from_numpy(np.concatenate(run["tensors"][f"ffn_norm-{il}"]))
    quantiles.append(torch.quantile(x.abs().sum(-1), torch.linspace(0, 1, 101)).numpy())
quantiles = np.stack(quantiles)
model = rewrite(plain, work / "odp.gguf", set_kv=odp_kv(mu, quantiles[:, 98], 0.02, quantiles))
print("mu per layer:", [round(float(m), 3) for m in mu], flush=True)

bin_dir = Path(os.environ["MC2GGUF_LLAMA_BUILD"]) / "build" / "bin"
def tool(name, *args, log=None):
    p = subprocess.run([str(bin_dir / name), *map(str, args)], capture_output=True, text=True, errors="replace")
    if log:
        (out / log).write_text(p.stdout + p.stderr)
    return p.stdout + p.stderr

print(tool("llama-bench", "-m", model, "-ngl", 99, "-p", 512, "-n", 128, "-r", 5, "--moe-prune", "0,1", "-o", "md",
           log="bench.md").split("\n\n")[0])
print(tool("llama-bench", "-m", model, "-ngl", 99, "-p", 512, "-n", 128, "-r", 5, "--moe-prune", "0,1", "-o", "json",
           log="bench.json")[-200:])
text = work / "text.txt"
text.write_text(" ".join(f"word{i % 97} the of and" for i in range(3000)))
for prune in ("off", "on"):
    o = tool("llama-perplexity", "-m", model, "-f", text, "-c", 256, "--chunks", 8, "-ngl", 99, "--moe-prune", prune,
             log=f"ppl-{prune}.log")
    print(f"perplexity --moe-prune {prune}:", [l for l in o.splitlines() if "estimate" in l.lower() or "MoE" in l or "moe" in l][-4:])
o = tool("llama-completion", "-m", model, "-p", "word1 the of", "-n", 32, "-ngl", 99, "--no-warmup", log="completion.log")
print("completion:", [l for l in o.splitlines() if "moe" in l.lower() or "eval time" in l][-5:])
