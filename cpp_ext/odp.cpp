// mc2gguf_odp::route — MC-MoE online dynamic pruning (ODP) of top-k MoE routing, as a PyTorch custom op;
// mc2gguf_odp::route_scores — the same rule on sigmoid scores with a selection bias and expert groups.
//
// Semantics: docs/odp.md. Python entry point and fallback: mc2gguf/odp.py (route / route_reference).
//
// This file holds the op's schema, the argument checks shared with the CUDA kernel, the CPU kernel
// (parallel over tokens with at::parallel_for) and a minimal Python module init so that importing the
// built library registers the op. It deliberately includes only light ATen headers (no
// <torch/extension.h>, no pybind11): the op is reached through torch.ops, which is what torch.compile
// traces, and the light headers cut the first-use compile from about a minute to seconds.
#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

#include "odp.h"
#include "odp_row.h"

namespace mc2gguf_odp {

int64_t n_protect(double ratio, int64_t T) {
  const double n = std::ceil(ratio * static_cast<double>(T) - 1e-6);
  if (!(n > 0.0)) return 0;
  return n >= static_cast<double>(T) ? T : static_cast<int64_t>(n);
}

Prepared prepare(const at::Tensor& logits, int64_t top_k, double mu, const std::optional<at::Tensor>& protect,
                 const std::optional<at::Tensor>& importance, double protect_ratio) {
  TORCH_CHECK_VALUE(logits.dim() == 2, msg("odp route: logits must be [T, E], got ", logits.dim(), " dims"));
  TORCH_CHECK_TYPE(at::isFloatingType(logits.scalar_type()),
                   msg("odp route: logits must be floating point, got ", logits.scalar_type()));
  Prepared p;
  p.T = logits.size(0);
  p.E = logits.size(1);
  p.k = top_k;
  TORCH_CHECK_VALUE(p.E >= 1, "odp route: need at least one expert");
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= p.E,
                    msg("odp route: top_k must be in [1, E=", p.E, "], got ", top_k));
  TORCH_CHECK_VALUE(mu >= 0.0, msg("odp route: mu must be >= 0 (and not NaN), got ", mu));
  TORCH_CHECK_VALUE(protect_ratio >= 0.0 && protect_ratio <= 1.0,
                    msg("odp route: protect_ratio must be in [0, 1], got ", protect_ratio));
  p.logits = logits.contiguous();
  p.thr = static_cast<float>(std::log(mu));  // log(0) = -inf: nothing is below it

  if (protect.has_value() && protect->defined()) {
    const at::Tensor& m = *protect;
    TORCH_CHECK_VALUE(m.dim() == 1 && m.size(0) == p.T,
                      msg("odp route: protect must be [T=", p.T, "], got ", m.sizes()));
    TORCH_CHECK_VALUE(m.device() == logits.device(),
                      msg("odp route: protect is on ", m.device(), ", logits on ", logits.device()));
    p.mask = m.to(at::kBool).contiguous();
  }
  if (protect_ratio > 0.0) {
    TORCH_CHECK_VALUE(importance.has_value() && importance->defined(),
                      "odp route: protect_ratio > 0 needs importance");
  }
  if (importance.has_value() && importance->defined()) {
    const at::Tensor& imp = *importance;
    TORCH_CHECK_VALUE(imp.dim() == 1 && imp.size(0) == p.T,
                      msg("odp route: importance must be [T=", p.T, "], got ", imp.sizes()));
    TORCH_CHECK_TYPE(at::isFloatingType(imp.scalar_type()),
                     msg("odp route: importance must be floating point, got ", imp.scalar_type()));
    TORCH_CHECK_VALUE(imp.device() == logits.device(),
                      msg("odp route: importance is on ", imp.device(), ", logits on ", logits.device()));
    const int64_t n = n_protect(protect_ratio, p.T);
    if (n > 0) {
      // The n largest importances, NaN as -inf, the lower index winning ties; ranked in the importance's
      // own dtype (its values are exact in double).
      at::Tensor mask = p.mask.defined() ? p.mask.clone() : at::zeros({p.T}, logits.options().dtype(at::kBool));
      if (imp.device().is_cpu()) {
        // O(T) selection under the total order (key descending, index ascending).
        const at::Tensor ic = imp.contiguous();
        std::vector<double> key(p.T);
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ic.scalar_type(), "mc2gguf_odp_importance", [&] {
          const scalar_t* v = ic.const_data_ptr<scalar_t>();
          for (int64_t j = 0; j < p.T; ++j) {
            const double d = static_cast<double>(v[j]);
            key[j] = std::isnan(d) ? -std::numeric_limits<double>::infinity() : d;
          }
        });
        std::vector<int64_t> order(p.T);
        std::iota(order.begin(), order.end(), int64_t(0));
        const auto before = [&key](int64_t a, int64_t b) { return key[a] > key[b] || (key[a] == key[b] && a < b); };
        if (n < p.T) std::nth_element(order.begin(), order.begin() + n, order.end(), before);
        bool* m = mask.data_ptr<bool>();
        for (int64_t i = 0; i < n; ++i) m[order[i]] = true;
      } else {
        // A stable descending sort keeps equal values in index order.
        const at::Tensor key = imp.masked_fill(imp.isnan(), -std::numeric_limits<double>::infinity());
        const at::Tensor order = std::get<1>(at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/true));
        mask.index_fill_(0, order.slice(0, 0, n), true);
      }
      p.mask = mask;
    }
  }
  return p;
}

ScoreGating prepare_scores(const Prepared& p, double mu, const std::optional<at::Tensor>& bias, int64_t n_group,
                           int64_t topk_group) {
  ScoreGating g;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == p.E,
                      msg("odp route_scores: bias must be [E=", p.E, "], got ", bias->sizes()));
    TORCH_CHECK_VALUE(bias->device() == p.logits.device(),
                      msg("odp route_scores: bias is on ", bias->device(), ", scores on ", p.logits.device()));
    g.bias = bias->to(at::kFloat).contiguous();
  }
  TORCH_CHECK_VALUE(n_group >= 1 && p.E % n_group == 0 && (n_group == 1 || p.E / n_group >= 2),
                    msg("odp route_scores: n_group must divide E=", p.E, " into groups of two or more, got ", n_group));
  TORCH_CHECK_VALUE(topk_group >= 1 && topk_group <= n_group,
                    msg("odp route_scores: topk_group must be in [1, n_group=", n_group, "], got ", topk_group));
  TORCH_CHECK_VALUE(n_group == 1 || p.k <= topk_group * (p.E / n_group),
                    msg("odp route_scores: top_k ", p.k, " exceeds the experts of ", topk_group, " groups"));
  g.n_group = static_cast<int>(n_group);
  g.topk_group = static_cast<int>(n_group == 1 ? 1 : topk_group);
  g.mu = static_cast<float>(mu);
  return g;
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> route_scores_cpu(
    const at::Tensor& scores, int64_t top_k, double mu, const std::optional<at::Tensor>& bias, int64_t n_group,
    int64_t topk_group, const std::optional<at::Tensor>& protect, const std::optional<at::Tensor>& importance,
    double protect_ratio, bool renormalize) {
  const Prepared p = prepare(scores, top_k, mu, protect, importance, protect_ratio);
  const ScoreGating g = prepare_scores(p, mu, bias, n_group, topk_group);
  at::Tensor ids = at::empty({p.T, p.k}, scores.options().dtype(at::kLong));
  at::Tensor weights = at::empty({p.T, p.k}, scores.options().dtype(at::kFloat));
  int64_t total = 0;
  if (p.T > 0) {
    const bool* mask = p.mask.defined() ? p.mask.const_data_ptr<bool>() : nullptr;
    const float* b = g.bias.defined() ? g.bias.const_data_ptr<float>() : nullptr;
    int64_t* id_out = ids.data_ptr<int64_t>();
    float* w_out = weights.data_ptr<float>();
    const int64_t E = p.E;
    const int k = static_cast<int>(p.k);
    const int64_t grain = std::max<int64_t>(1, 32768 / (E * p.k));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.logits.scalar_type(), "mc2gguf_odp_scores_cpu", [&] {
      const scalar_t* w = p.logits.const_data_ptr<scalar_t>();
      total = at::parallel_reduce(
          0, p.T, grain, int64_t(0),
          [&](int64_t begin, int64_t end, int64_t acc) {
            std::vector<float> choice(E), group_score(g.n_group), group_val(g.n_group);
            std::vector<int> group_id(g.n_group);
            for (int64_t t = begin; t < end; ++t) {
              acc += route_row_scores<scalar_t, int64_t>(
                  w + t * E, b, E, k, g.n_group, g.topk_group, g.mu, mask != nullptr && mask[t], renormalize,
                  id_out + t * k, w_out + t * k, choice.data(), group_score.data(), group_val.data(), group_id.data());
            }
            return acc;
          },
          std::plus<int64_t>());
    });
  }
  return {ids, weights, at::scalar_tensor(total, scores.options().dtype(at::kLong))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> route_cpu(const at::Tensor& logits, int64_t top_k, double mu,
                                                         const std::optional<at::Tensor>& protect,
                                                         const std::optional<at::Tensor>& importance,
                                                         double protect_ratio, bool renormalize) {
  const Prepared p = prepare(logits, top_k, mu, protect, importance, protect_ratio);
  at::Tensor ids = at::empty({p.T, p.k}, logits.options().dtype(at::kLong));
  at::Tensor weights = at::empty({p.T, p.k}, logits.options().dtype(at::kFloat));
  int64_t total = 0;
  if (p.T > 0) {
    const bool* mask = p.mask.defined() ? p.mask.const_data_ptr<bool>() : nullptr;
    int64_t* id_out = ids.data_ptr<int64_t>();
    float* w_out = weights.data_ptr<float>();
    const int64_t E = p.E;
    const int k = static_cast<int>(p.k);
    const float thr = p.thr;
    // About E*k simple steps per token: chunks of a few thousand tokens amortise the thread hand-off.
    const int64_t grain = std::max<int64_t>(1, 32768 / (E * p.k));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.logits.scalar_type(), "mc2gguf_odp_route_cpu", [&] {
      const scalar_t* x = p.logits.const_data_ptr<scalar_t>();
      total = at::parallel_reduce(
          0, p.T, grain, int64_t(0),
          [&](int64_t begin, int64_t end, int64_t acc) {
            for (int64_t t = begin; t < end; ++t) {
              acc += route_row<scalar_t, int64_t>(x + t * E, E, k, thr, mask != nullptr && mask[t], renormalize,
                                                  id_out + t * k, w_out + t * k);
            }
            return acc;
          },
          std::plus<int64_t>());
    });
  }
  return {ids, weights, at::scalar_tensor(total, logits.options().dtype(at::kLong))};
}

}  // namespace

TORCH_LIBRARY(mc2gguf_odp, m) {
  m.def(
      "route(Tensor logits, int top_k, float mu, Tensor? protect=None, Tensor? importance=None, "
      "float protect_ratio=0.0, bool renormalize=True) -> (Tensor ids, Tensor weights, Tensor n_pruned)");
  m.def(
      "route_scores(Tensor scores, int top_k, float mu, Tensor? bias=None, int n_group=1, int topk_group=1, "
      "Tensor? protect=None, Tensor? importance=None, float protect_ratio=0.0, bool renormalize=True) -> "
      "(Tensor ids, Tensor weights, Tensor n_pruned)");
}

TORCH_LIBRARY_IMPL(mc2gguf_odp, CPU, m) {
  m.impl("route", &route_cpu);
  m.impl("route_scores", &route_scores_cpu);
}

}  // namespace mc2gguf_odp

// Importing the built library as a Python module runs the static registrations above. The module itself
// is empty (PyTorch's recommended pattern for custom ops without pybind11); the name comes from the
// build (TORCH_EXTENSION_NAME is set by torch.utils.cpp_extension for setup.py and JIT builds alike).
#define ODP_CAT2(a, b) a##b
#define ODP_CAT(a, b) ODP_CAT2(a, b)
#define ODP_STR2(a) #a
#define ODP_STR(a) ODP_STR2(a)

extern "C" PyMODINIT_FUNC ODP_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, ODP_STR(TORCH_EXTENSION_NAME), "mc2gguf_odp::route (see docs/odp.md)", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
