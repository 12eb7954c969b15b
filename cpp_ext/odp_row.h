// ODP routing of one token: the per-row rule of docs/odp.md, shared by the CPU (odp.cpp) and CUDA
// (odp_cuda.cu) kernels so that both run literally the same arithmetic.
//
// Plain C++ on purpose (no ATen): the header is included by g++ and by nvcc, host and device.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define ODP_HD __host__ __device__ __forceinline__
#else
#define ODP_HD inline
#endif

namespace mc2gguf_odp {

// Route one token.
//   x      [E] logits (any floating type; each value is converted to fp32 first)
//   thr    fl32(ln(mu)): slot s > 0 of an unprotected token is pruned iff fl32(l_s - l_0) < thr
//   prot   the token is protected (never pruned)
//   ids    [k] out: expert ids in slot order, -1 for pruned slots
//   val    [k] scratch for the selected logits; on return the weights (0 for pruned slots)
// Returns the number of pruned slots.
//
// Selection: slots are ordered by (logit descending, expert id ascending). Scanning experts in
// increasing id order and only ever moving an entry past a *strictly* smaller one gives exactly that
// order: an expert whose logit equals one already held lands behind it, so the lower id wins ties.
template <typename scalar_t, typename index_t>
ODP_HD int route_row(const scalar_t* x, int64_t E, int k, float thr, bool prot, index_t* ids, float* val) {
  int n = 0;
  for (int64_t e = 0; e < E; ++e) {
    const float v = static_cast<float>(x[e]);
    int pos;
    if (n < k) {
      pos = n++;
    } else if (v > val[k - 1]) {
      pos = k - 1;
    } else {
      continue;
    }
    while (pos > 0 && val[pos - 1] < v) {
      val[pos] = val[pos - 1];
      ids[pos] = ids[pos - 1];
      --pos;
    }
    val[pos] = v;
    ids[pos] = static_cast<index_t>(e);
  }

  // Weights: w_s = exp(l_s - l_0) / sum over surviving slots of exp(l_j - l_0), in fp32, summed in slot
  // order. This is softmax -> top-k -> renormalise (the full softmax denominator cancels).
  const float top = val[0];
  float sum = 0.0f;
  int pruned = 0;
  for (int s = 0; s < k; ++s) {
    const float d = val[s] - top;
    if (s > 0 && !prot && d < thr) {
      val[s] = 0.0f;
      ids[s] = static_cast<index_t>(-1);
      ++pruned;
    } else {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
      const float ex = expf(d);
#else
      const float ex = std::exp(d);
#endif
      val[s] = ex;
      sum += ex;
    }
  }
  for (int s = 0; s < k; ++s) {
    val[s] = val[s] / sum;  // pruned slots stay 0; the top slot has ex = 1 so sum >= 1
  }
  return pruned;
}

}  // namespace mc2gguf_odp
