// CUDA implementation of mc2gguf_odp::route and route_scores (docs/odp.md): one thread per token, running the
// same route_row() / route_row_scores() as the CPU kernels. Compiled only where nvcc and a CUDA build of torch are present.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "odp.h"
#include "odp_row.h"

namespace mc2gguf_odp {
namespace {

constexpr int kMaxTopK = 32;  // per-thread scratch; Mixtral uses k = 2

template <typename scalar_t>
__global__ void route_kernel(const scalar_t* __restrict__ x, int64_t T, int64_t E, int k, float thr,
                             bool renormalize, const bool* __restrict__ mask, int64_t* __restrict__ ids,
                             float* __restrict__ weights,
                             unsigned long long* __restrict__ n_pruned) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= T) return;
  int64_t id[kMaxTopK];
  float val[kMaxTopK];
  const bool prot = mask != nullptr && mask[t];
  const int pruned = route_row<scalar_t, int64_t>(x + t * E, E, k, thr, prot, renormalize, id, val);
  for (int s = 0; s < k; ++s) {
    ids[t * k + s] = id[s];
    weights[t * k + s] = val[s];
  }
  if (pruned) atomicAdd(n_pruned, static_cast<unsigned long long>(pruned));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> route_cuda(const at::Tensor& logits, int64_t top_k, double mu,
                                                          const std::optional<at::Tensor>& protect,
                                                          const std::optional<at::Tensor>& importance,
                                                          double protect_ratio, bool renormalize) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const Prepared p = prepare(logits, top_k, mu, protect, importance, protect_ratio);
  TORCH_CHECK_VALUE(p.k <= kMaxTopK, 
                    msg("odp route: the CUDA kernel supports top_k <= ", kMaxTopK, ", got ", p.k));
  at::Tensor ids = at::empty({p.T, p.k}, logits.options().dtype(at::kLong));
  at::Tensor weights = at::empty({p.T, p.k}, logits.options().dtype(at::kFloat));
  at::Tensor n_pruned = at::zeros({}, logits.options().dtype(at::kLong));
  if (p.T > 0) {
    const int threads = 128;
    const int64_t blocks = (p.T + threads - 1) / threads;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const bool* mask = p.mask.defined() ? p.mask.const_data_ptr<bool>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.logits.scalar_type(), "mc2gguf_odp_route_cuda", [&] {
      route_kernel<scalar_t><<<static_cast<unsigned int>(blocks), threads, 0, stream>>>(
          p.logits.const_data_ptr<scalar_t>(), p.T, p.E, static_cast<int>(p.k), p.thr, renormalize, mask,
          ids.data_ptr<int64_t>(), weights.data_ptr<float>(),
          reinterpret_cast<unsigned long long*>(n_pruned.data_ptr<int64_t>()));
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {ids, weights, n_pruned};
}

constexpr int kMaxExperts = 512;  // per-thread scratch of route_scores (DeepSeek-V3: 256)
constexpr int kMaxGroups = 64;

template <typename scalar_t>
__global__ void route_scores_kernel(const scalar_t* __restrict__ w, const float* __restrict__ bias, int64_t T,
                                    int64_t E, int k, int n_group, int topk_group, float mu, bool renormalize,
                                    const bool* __restrict__ mask, int64_t* __restrict__ ids,
                                    float* __restrict__ weights, unsigned long long* __restrict__ n_pruned) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= T) return;
  int64_t id[kMaxTopK];
  float val[kMaxTopK];
  float choice[kMaxExperts];
  float group_score[kMaxGroups];
  float group_val[kMaxGroups];
  int group_id[kMaxGroups];
  const bool prot = mask != nullptr && mask[t];
  const int pruned = route_row_scores<scalar_t, int64_t>(w + t * E, bias, E, k, n_group, topk_group, mu, prot,
                                                         renormalize, id, val, choice, group_score, group_val,
                                                         group_id);
  for (int s = 0; s < k; ++s) {
    ids[t * k + s] = id[s];
    weights[t * k + s] = val[s];
  }
  if (pruned) atomicAdd(n_pruned, static_cast<unsigned long long>(pruned));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> route_scores_cuda(
    const at::Tensor& scores, int64_t top_k, double mu, const std::optional<at::Tensor>& bias, int64_t n_group,
    int64_t topk_group, const std::optional<at::Tensor>& protect, const std::optional<at::Tensor>& importance,
    double protect_ratio, bool renormalize) {
  const c10::cuda::CUDAGuard guard(scores.device());
  const Prepared p = prepare(scores, top_k, mu, protect, importance, protect_ratio);
  const ScoreGating g = prepare_scores(p, mu, bias, n_group, topk_group);
  TORCH_CHECK_VALUE(p.k <= kMaxTopK && p.E <= kMaxExperts && g.n_group <= kMaxGroups,
                    msg("odp route_scores: the CUDA kernel supports top_k <= ", kMaxTopK, ", E <= ", kMaxExperts,
                        " and n_group <= ", kMaxGroups));
  at::Tensor ids = at::empty({p.T, p.k}, scores.options().dtype(at::kLong));
  at::Tensor weights = at::empty({p.T, p.k}, scores.options().dtype(at::kFloat));
  at::Tensor n_pruned = at::zeros({}, scores.options().dtype(at::kLong));
  if (p.T > 0) {
    const int threads = 128;
    const int64_t blocks = (p.T + threads - 1) / threads;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const bool* mask = p.mask.defined() ? p.mask.const_data_ptr<bool>() : nullptr;
    const float* b = g.bias.defined() ? g.bias.const_data_ptr<float>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.logits.scalar_type(), "mc2gguf_odp_scores_cuda", [&] {
      route_scores_kernel<scalar_t><<<static_cast<unsigned int>(blocks), threads, 0, stream>>>(
          p.logits.const_data_ptr<scalar_t>(), b, p.T, p.E, static_cast<int>(p.k), g.n_group, g.topk_group, g.mu,
          renormalize, mask, ids.data_ptr<int64_t>(), weights.data_ptr<float>(),
          reinterpret_cast<unsigned long long*>(n_pruned.data_ptr<int64_t>()));
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {ids, weights, n_pruned};
}

}  // namespace

TORCH_LIBRARY_IMPL(mc2gguf_odp, CUDA, m) {
  m.impl("route", &route_cuda);
  m.impl("route_scores", &route_scores_cuda);
}

}  // namespace mc2gguf_odp
