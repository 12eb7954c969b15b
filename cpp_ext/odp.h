// Host-side pieces shared by the CPU (odp.cpp) and CUDA (odp_cuda.cu) implementations of
// mc2gguf_odp::route. The semantics are those of docs/odp.md.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace mc2gguf_odp {

// The validated, normalised inputs of one call.
struct Prepared {
  at::Tensor logits;  // [T, E], contiguous, the caller's floating dtype (converted to fp32 per value)
  at::Tensor mask;    // [T] bool, contiguous, on the logits' device; undefined when no token is protected
  int64_t T = 0;
  int64_t E = 0;
  int64_t k = 0;
  float thr = 0.0f;   // fl32(ln(mu)); -inf for mu = 0
};

// Checks the arguments (raising c10::Error, i.e. RuntimeError/ValueError in Python, on misuse) and
// builds the protection mask: protect (if given) OR the n_protect(protect_ratio, T) tokens of highest
// importance (if importance is given), ties broken by lower token index, NaN ranked as -inf.
Prepared prepare(const at::Tensor& logits, int64_t top_k, double mu, const std::optional<at::Tensor>& protect,
                 const std::optional<at::Tensor>& importance, double protect_ratio);

// ceil(ratio * T - 1e-6) clamped to [0, T], the product taken in double (docs/odp.md).
int64_t n_protect(double ratio, int64_t T);

}  // namespace mc2gguf_odp
