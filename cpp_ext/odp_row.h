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

// Sigmoid scores (DeepSeek-V3; docs/odp.md, "Sigmoid scores"), given the scores w [E] (fp32 sigmoid of the
// logits, computed by the caller so that every implementation reads the same values):
//   choice_e = w_e + bias_e; with n_group > 1 only the topk_group groups of E / n_group consecutive experts whose
//   two best choices sum highest stay (lower group index first among equals), the others' choices -inf;
//   the k experts of highest choice in slot order (lower id first among equals);
//   slot s > 0 of an unprotected token pruned iff w_s < fl32(w_0 * mu);
//   the survivors keep w_s, renormalised (the sum in slot order, floored at 6.103515625e-5) where asked.
//   choice [E], group_score, group_val [n_group] and group_id [n_group] are scratch.
// On return val holds the weights (0 in pruned slots) and ids -1 in pruned slots. Returns the pruned count.
template <typename scalar_t, typename index_t>
ODP_HD int route_row_scores(const scalar_t* w, const float* bias, int64_t E, int k, int n_group, int topk_group,
                            float mu, bool prot, bool renormalize, index_t* ids, float* val, float* choice,
                            float* group_score, float* group_val, int* group_id) {
  for (int64_t e = 0; e < E; ++e) {
    choice[e] = static_cast<float>(w[e]) + (bias != nullptr ? bias[e] : 0.0f);
  }
  if (n_group > 1) {
    const int64_t per = E / n_group;
    for (int g = 0; g < n_group; ++g) {
      float v0 = -INFINITY, v1 = -INFINITY;
      for (int64_t e = g * per; e < (g + 1) * per; ++e) {
        const float v = choice[e];
        if (v > v0) {
          v1 = v0;
          v0 = v;
        } else if (v > v1) {
          v1 = v;
        }
      }
      group_score[g] = v0 + v1;
    }
    route_select(group_score, n_group, topk_group, group_id, group_val);
    for (int g = 0; g < n_group; ++g) {
      bool chosen = false;
      for (int j = 0; j < topk_group; ++j) chosen = chosen || group_id[j] == g;
      if (!chosen) {
        for (int64_t e = g * per; e < (g + 1) * per; ++e) choice[e] = -INFINITY;
      }
    }
  }
  route_select(choice, E, k, ids, val);
  const float floor_w0 = static_cast<float>(w[ids[0]]) * mu;
  float sum = 0.0f;
  int pruned = 0;
  for (int s = 0; s < k; ++s) {
    const float ws = static_cast<float>(w[ids[s]]);
    if (s > 0 && !prot && ws < floor_w0) {
      val[s] = 0.0f;
      ids[s] = static_cast<index_t>(-1);
      ++pruned;
    } else {
      val[s] = ws;
      sum += ws;
    }
  }
  if (renormalize) {
    const float total = sum < 6.103515625e-5f ? 6.103515625e-5f : sum;
    for (int s = 0; s < k; ++s) val[s] = val[s] / total;
  }
  return pruned;
}

}  // namespace mc2gguf_odp
