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

// Top-k selection for any k: slots ordered by (logit descending, expert id ascending). Scanning experts
// in increasing id order and only ever moving an entry past a *strictly* smaller one gives exactly that
// order: an expert whose logit equals one already held lands behind it, so the lower id wins ties.
template <typename scalar_t, typename index_t>
ODP_HD void route_select(const scalar_t* x, int64_t E, int k, index_t* ids, float* val) {
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
}

// k = 2 (Mixtral), branch-free: selects instead of data-dependent jumps, the same order as route_select.
// A candidate displaces a slot only when strictly greater, so the lower id keeps a tie.
template <typename scalar_t, typename index_t>
ODP_HD void route_select2(const scalar_t* x, int64_t E, index_t* ids, float* val) {
  const float a = static_cast<float>(x[0]);
  const float b = static_cast<float>(x[1]);
  const bool swap = b > a;
  float v0 = swap ? b : a;
  float v1 = swap ? a : b;
  int64_t i0 = swap ? 1 : 0;
  int64_t i1 = swap ? 0 : 1;
  for (int64_t e = 2; e < E; ++e) {
    const float v = static_cast<float>(x[e]);
    const bool gt0 = v > v0;
    const bool gt1 = v > v1;
    v1 = gt0 ? v0 : (gt1 ? v : v1);
    i1 = gt0 ? i0 : (gt1 ? e : i1);
    v0 = gt0 ? v : v0;
    i0 = gt0 ? e : i0;
  }
  val[0] = v0;
  val[1] = v1;
  ids[0] = static_cast<index_t>(i0);
  ids[1] = static_cast<index_t>(i1);
}

// exp in fp32, the same function on the host and on the device.
ODP_HD float route_exp(float d) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return expf(d);
#else
  return std::exp(d);
#endif
}

// Pruning and weights, given the k selected logits in val (slot order) and their ids:
// slot s > 0 of an unprotected token is pruned iff fl32(l_s - l_0) < thr; survivors get
// w_s = exp(l_s - l_0) / Z. Renormalised routing: Z is the fp32 sum of the survivors' exp(l_j - l_0) in slot
// order (softmax -> top-k -> renormalise with the full softmax denominator cancelled). Otherwise Z is the
// softmax denominator, the fp32 sum of exp(l_e - l_0) over all E experts in id order, so that survivors keep
// their plain-routing weights.
// On return val holds the weights (0 in pruned slots) and ids -1 in pruned slots.
template <typename scalar_t, typename index_t>
ODP_HD int route_weights(const scalar_t* x, int64_t E, int k, float thr, bool prot, bool renormalize,
                         index_t* ids, float* val) {
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
      const float ex = s == 0 ? 1.0f : route_exp(d);  // exp(0) = 1 exactly
      val[s] = ex;
      sum += ex;
    }
  }
  if (!renormalize) {
    sum = 0.0f;
    for (int64_t e = 0; e < E; ++e) {
      sum += route_exp(static_cast<float>(x[e]) - top);
    }
  }
  for (int s = 0; s < k; ++s) {
    val[s] = val[s] / sum;  // pruned slots stay 0; the top expert has exp(0) = 1, so sum >= 1
  }
  return pruned;
}

// Route one token.
//   x            [E] logits (any floating type; each value is converted to fp32 first)
//   thr          fl32(ln(mu))
//   prot         the token is protected (never pruned)
//   renormalize  the family renormalises the top-k weights (else they keep their softmax weights)
//   ids          [k] out: expert ids in slot order, -1 for pruned slots
//   val          [k] scratch for the selected logits; on return the weights (0 for pruned slots)
// Returns the number of pruned slots.
template <typename scalar_t, typename index_t>
ODP_HD int route_row(const scalar_t* x, int64_t E, int k, float thr, bool prot, bool renormalize, index_t* ids,
                     float* val) {
  if (k == 2) {
    route_select2(x, E, ids, val);
  } else {
    route_select(x, E, k, ids, val);
  }
  return route_weights(x, E, k, thr, prot, renormalize, ids, val);
}

}  // namespace mc2gguf_odp
