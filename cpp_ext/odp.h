// Host-side pieces shared by the CPU (odp.cpp) and CUDA (odp_cuda.cu) implementations of
// mc2gguf_odp::route. The semantics are those of docs/odp.md.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>

namespace mc2gguf_odp {

// Error messages are built here, with std::to_string and string concatenation, and handed to the
// TORCH_CHECK_* macros as one std::string. Passing numbers to the macros instead instantiates c10::str's
// ostringstream formatting in this library, which segfaulted when the error was raised with torch
// 2.11+cu130 built by g++ 13 (seen on the GPU machine, for ints, doubles and sizes alike); a ready-made
// string goes through c10::str's no-formatting specialisation.
namespace detail {
inline void put(std::string& s, const char* v) { s += v; }
inline void put(std::string& s, const std::string& v) { s += v; }
inline void put(std::string& s, int64_t v) { s += std::to_string(v); }
inline void put(std::string& s, int v) { s += std::to_string(v); }
inline void put(std::string& s, double v) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "%g", v);
  s += buf;
}
inline void put(std::string& s, c10::IntArrayRef v) {
  s += "[";
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  s += "]";
}
inline void put(std::string& s, const c10::Device& d) { s += d.str(); }
inline void put(std::string& s, c10::ScalarType t) { s += c10::toString(t); }
}  // namespace detail

template <typename... Args>
std::string msg(const Args&... args) {
  std::string s;
  (detail::put(s, args), ...);
  return s;
}

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

// The extra arguments of route_scores (sigmoid scores): the selection bias as a contiguous fp32 tensor on the
// scores' device (undefined: none), the group counts checked against E and top_k, mu in fp32.
struct ScoreGating {
  at::Tensor bias;
  int n_group = 1;
  int topk_group = 1;
  float mu = 0.0f;
};

ScoreGating prepare_scores(const Prepared& p, double mu, const std::optional<at::Tensor>& bias, int64_t n_group,
                           int64_t topk_group);

// ceil(ratio * T - 1e-6) clamped to [0, T], the product taken in double (docs/odp.md).
int64_t n_protect(double ratio, int64_t T);

}  // namespace mc2gguf_odp
