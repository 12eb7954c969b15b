// CUDA implementation of mc2gguf_odp::route (docs/odp.md): one thread per token, running the same
// route_row() as the CPU kernel. Compiled only where nvcc and a CUDA build of torch are present.
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

}  // namespace

TORCH_LIBRARY_IMPL(mc2gguf_odp, CUDA, m) { m.impl("route", &route_cuda); }

}  // namespace mc2gguf_odp
