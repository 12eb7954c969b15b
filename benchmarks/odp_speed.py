"""ODP speed (not a test): the compiled routing op vs the torch reference, and what importance scoring costs
next to one MoE layer forward.

    python3 benchmarks/odp_speed.py                 # CPU, the defaults below
    python3 benchmarks/odp_speed.py --device cuda   # where a GPU and the CUDA build of the op exist

The MoE layer is Mixtral-shaped but scaled down (hidden 1024, expert 3584, 8 experts, top-2, 8 heads of 128)
by default: Mixtral's hidden 4096 / expert 14336 is 5.6 GB of fp32 expert weights per layer and tens of
seconds per forward on two cores. ``--hidden 4096 --ffn 14336`` runs the real shape where memory allows.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mc2gguf import odp


def timeit(fn, device: str, repeat: int, min_time: float = 0.2) -> float:
    """Median seconds per call over ``repeat`` rounds, each round long enough to time."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    once = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, int(min_time / once / repeat))
    rounds = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        rounds.append((time.perf_counter() - t0) / inner)
    return statistics.median(rounds)


def fmt(s: float) -> str:
    return f"{s * 1e6:9.1f} us" if s < 1e-3 else f"{s * 1e3:9.2f} ms"


class MoE:
    """A Mixtral sparse-MoE block (router + SwiGLU experts), computed only for the routed (token, expert)s."""

    def __init__(self, hidden: int, ffn: int, experts: int, device: str, dtype: torch.dtype, gen: torch.Generator):
        def w(*shape):
            return (torch.randn(*shape, generator=gen) * shape[-1] ** -0.5).to(device, dtype)

        self.router = w(experts, hidden)
        self.w1 = [w(ffn, hidden) for _ in range(experts)]
        self.w3 = [w(ffn, hidden) for _ in range(experts)]
        self.w2 = [w(hidden, ffn) for _ in range(experts)]

    def logits(self, x):
        return x @ self.router.T

    def forward(self, x, ids, weights):
        out = torch.zeros_like(x)
        for e in range(len(self.w1)):
            tok, slot = torch.nonzero(ids == e, as_tuple=True)
            if tok.numel() == 0:
                continue
            h = x[tok]
            y = (torch.nn.functional.silu(h @ self.w1[e].T) * (h @ self.w3[e].T)) @ self.w2[e].T
            out.index_add_(0, tok, y * weights[tok, slot, None].to(y.dtype))
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=4096, help="T for the routing timings")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--layer-tokens", type=int, default=1024, help="T for the MoE layer comparison")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=3584)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    gen = torch.Generator().manual_seed(0)
    print(f"ODP backend: {odp.BACKEND} ({odp.BACKEND_DETAIL}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads, device {dev}"
          + (f" ({torch.cuda.get_device_name()})" if dev == "cuda" else ""))

    # ---- routing: op vs reference
    T, E, k = args.tokens, args.experts, args.top_k
    print(f"\nrouting T={T} E={E} k={k}, mu=0.5 (median of each timing over {args.repeat} rounds)")
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(T, E, generator=gen).to(dev, dtype)
        imp = torch.rand(T, generator=gen).to(dev)
        for label, kw in (("no protection", {}), ("importance, ratio 0.02", {"importance": imp, "protect_ratio": 0.02})):
            t_ref = timeit(lambda: odp.route_reference(logits, k, 0.5, **kw), dev, args.repeat)
            line = f"  {str(dtype).split('.')[-1]:8s} {label:24s} reference {fmt(t_ref)}"
            if odp.BACKEND != "torch" and (dev == "cpu" or odp.BACKEND == "cuda"):
                t_op = timeit(lambda: torch.ops.mc2gguf_odp.route(logits, k, 0.5, None, kw.get("importance"),
                                                                  kw.get("protect_ratio", 0.0)), dev, args.repeat)
                line += f"   op {fmt(t_op)}   x{t_ref / t_op:6.1f}"
            print(line)
    one = torch.randn(1, E, generator=gen).to(dev)
    t_ref = timeit(lambda: odp.route_reference(one, k, 0.5), dev, args.repeat)
    line = f"  decode, T=1 fp32{'':16s} reference {fmt(t_ref)}"
    if odp.BACKEND != "torch" and (dev == "cpu" or odp.BACKEND == "cuda"):
        t_op = timeit(lambda: torch.ops.mc2gguf_odp.route(one, k, 0.5), dev, args.repeat)
        line += f"   op {fmt(t_op)}   x{t_ref / t_op:6.1f}"
    print(line)

    # ---- importance scoring vs one MoE layer
    L, H, F, nh, hd = args.layer_tokens, args.hidden, args.ffn, args.heads, args.head_dim
    dtype = torch.float32 if dev == "cpu" else torch.bfloat16
    print(f"\none MoE layer: T={L}, hidden {H}, expert {F}, {E} experts, top-{k}, {nh} heads x {hd}, "
          f"{str(dtype).split('.')[-1]}")
    moe = MoE(H, F, E, dev, dtype, gen)
    x = torch.randn(L, H, generator=gen).to(dev, dtype)
    q = torch.randn(nh, L, hd, generator=gen).to(dev, dtype)
    kk = torch.randn(nh, L, hd, generator=gen).to(dev, dtype)
    scores = (q.float() @ kk.float().transpose(1, 2)) * hd ** -0.5
    probs = torch.softmax(scores.masked_fill(torch.ones(L, L, dtype=torch.bool, device=dev).triu(1), float("-inf")), -1)
    logits = moe.logits(x)
    ids0, w0, _ = odp.route(logits, k, 0.0)
    mu = odp.calibrate_mu(odp.top2_ratios(logits))
    ids1, w1, n1 = odp.route(logits, k, mu, importance=odp.token_importance(x, probs), protect_ratio=0.02)

    t_moe = timeit(lambda: moe.forward(x, ids0, w0), dev, max(3, args.repeat // 2))
    t_moe_odp = timeit(lambda: moe.forward(x, ids1, w1), dev, max(3, args.repeat // 2))
    t_imp = timeit(lambda: odp.token_importance(x, probs), dev, args.repeat)
    t_qk = timeit(lambda: odp.attention_received_from_qk(q, kk), dev, max(3, args.repeat // 2))
    t_route = timeit(lambda: odp.route(logits, k, mu, importance=odp.token_importance(x, probs), protect_ratio=0.02),
                     dev, args.repeat)
    print(f"  MoE forward, plain top-{k}                    {fmt(t_moe)}")
    print(f"  MoE forward, ODP mu={mu:.3f} ({n1}/{L * k} slots pruned) {fmt(t_moe_odp)}   x{t_moe / t_moe_odp:.2f}")
    print(f"  importance from attention probs [{nh},{L},{L}]   {fmt(t_imp)}   = {100 * t_imp / t_moe:5.2f}% of the MoE forward")
    print(f"  importance recomputed from q, k              {fmt(t_qk)}   = {100 * t_qk / t_moe:5.2f}%")
    print(f"  importance + ODP route                       {fmt(t_route)}   = {100 * t_route / t_moe:5.2f}%")


if __name__ == "__main__":
    main()
