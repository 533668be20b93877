// torch.library binding of the native CUDA kernels: implements the v4k_impl schemas on the CUDA
// dispatch key (the schemas are defined once, in Python, by v4kernels._registry.declare_op) and
// helper ops in the private namespace v4k_cuda that the Python adapters combine with vendor or
// Triton kernels (top-k selection over precomputed scores; hc_pre after a vendor prenorm GEMM;
// the compressor's pooling epilogue and state after Triton's projection).
//
// Built only when torch has CUDA (v4kernels/backends/cuda.py). Every op checks the facts its
// raw-pointer launcher relies on, makes inputs contiguous, allocates outputs and launches on the
// current stream of the input's device.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "launchers.h"

namespace {

using at::Tensor;

int float_code(const Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return V4K_F32;
    case at::kBFloat16:
      return V4K_BF16;
    case at::kHalf:
      return V4K_F16;
    default:
      TORCH_CHECK(false, "v4k_impl::", op, " (cuda): ", name, " must be float32/bfloat16/float16, got ",
                  t.scalar_type());
  }
  return -1;
}

void check_cuda(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "v4k_impl::", op, " (cuda): ", name, " must be a CUDA tensor, got ", t.device());
}

void check_launch(int err, const char* op) {
  TORCH_CHECK(err == 0, "v4k_impl::", op, " (cuda): kernel launch failed with CUDA error ", err);
}

void* stream_of(const Tensor& t) { return at::cuda::getCurrentCUDAStream(t.get_device()).stream(); }

Tensor f32(const Tensor& t) { return t.to(at::kFloat).contiguous(); }

// ------------------------------------------------------------------------------ indexer
struct Keys {
  int fmt, dtype;
  Tensor data, scales;
};

Keys key_storage(const Tensor& keys, const std::optional<Tensor>& key_scales, int dim, const char* op) {
  Keys k{V4K_KEYS_FLOAT, V4K_F32, keys.contiguous(), Tensor()};
  if (keys.scalar_type() == at::kFloat8_e4m3fn) {
    TORCH_CHECK(dim % 128 == 0, "v4k_impl::", op, " (cuda): FP8 keys need dI % 128 == 0, got ", dim);
    k.fmt = V4K_KEYS_FP8;
  } else if (keys.scalar_type() == at::kByte) {
    TORCH_CHECK(dim % 32 == 0, "v4k_impl::", op, " (cuda): FP4 keys need dI % 32 == 0, got ", dim);
    k.fmt = V4K_KEYS_FP4;
  } else {
    k.dtype = float_code(keys, op, "keys");
  }
  if (k.fmt != V4K_KEYS_FLOAT) {
    TORCH_CHECK(key_scales.has_value(), "v4k_impl::", op, " (cuda): quantised keys need key_scales");
    k.scales = f32(*key_scales);  // fp32 or UE8M0 storage; the kernel reads fp32
  }
  return k;
}

// rows = B*S flattened; limits[r] = min((t_r + 1) // ratio, N); row_batch[r] = r // S
std::tuple<Tensor, Tensor> row_meta(const Tensor& positions, int64_t b, int64_t s, int64_t n, int64_t ratio) {
  Tensor lim = at::clamp_max(at::floor_divide(positions.reshape({b * s}).to(at::kLong) + 1, ratio), n).contiguous();
  Tensor rb = at::arange(b, positions.options().dtype(at::kLong)).repeat_interleave(s).contiguous();
  return {lim, rb};
}

// rows per chunk of materialised scores: at most ~256 MiB of fp32 per chunk
int64_t chunk_rows(int64_t rows, int64_t n) {
  const int64_t budget = (int64_t(1) << 26) / std::max<int64_t>(n, 1);
  return std::max<int64_t>(1, std::min(rows, budget));
}

void run_scores(const Tensor& q, const Tensor& w, const Keys& k, const Tensor& rb, const Tensor& lim, int64_t r0,
                int64_t rows, int64_t n, int heads, int dim, float* out, int64_t ld, const char* op) {
  const auto qe = q.element_size(), we = w.element_size();
  check_launch(v4k_indexer_scores(static_cast<const char*>(q.data_ptr()) + r0 * heads * dim * qe, float_code(q, op, "q"),
                                  static_cast<const char*>(w.data_ptr()) + r0 * heads * we, float_code(w, op, "weights"),
                                  k.data.data_ptr(), k.fmt, k.dtype,
                                  k.scales.defined() ? k.scales.data_ptr<float>() : nullptr, rb.data_ptr<int64_t>() + r0,
                                  lim.data_ptr<int64_t>() + r0, rows, n, heads, dim, out, ld, stream_of(q)),
               op);
}

Tensor indexer_scores(const Tensor& q, const Tensor& weights, const Tensor& keys, const std::optional<Tensor>& key_scales,
                      const Tensor& positions, int64_t ratio) {
  const char* op = "indexer_scores";
  check_cuda(q, op, "q");
  c10::cuda::CUDAGuard guard(q.device());
  const int64_t b = q.size(0), s = q.size(1), h = q.size(2), d = q.size(3), n = keys.size(1);
  Tensor qc = q.contiguous(), wc = weights.contiguous();
  Keys k = key_storage(keys, key_scales, static_cast<int>(d), op);
  auto [lim, rb] = row_meta(positions, b, s, n, ratio);
  Tensor out = at::empty({b, s, n}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  run_scores(qc, wc, k, rb, lim, 0, b * s, n, static_cast<int>(h), static_cast<int>(d), out.data_ptr<float>(), n, op);
  return out;
}

Tensor topk_rows(const Tensor& scores, const Tensor& lim, int64_t k, int64_t offset, const char* op);

Tensor indexer_topk(const Tensor& q, const Tensor& weights, const Tensor& keys, const std::optional<Tensor>& key_scales,
                    const Tensor& positions, int64_t topk, int64_t ratio, int64_t offset) {
  const char* op = "indexer_topk";
  check_cuda(q, op, "q");
  c10::cuda::CUDAGuard guard(q.device());
  const int64_t b = q.size(0), s = q.size(1), h = q.size(2), d = q.size(3), n = keys.size(1);
  const int64_t k = std::min(topk, n);
  TORCH_CHECK(k <= V4K_TOPK_MAX, "v4k_impl::", op, " (cuda): top-k width must be <= ", V4K_TOPK_MAX, ", got ", k);
  Tensor qc = q.contiguous(), wc = weights.contiguous();
  Keys kk = key_storage(keys, key_scales, static_cast<int>(d), op);
  auto [lim, rb] = row_meta(positions, b, s, n, ratio);
  Tensor out = at::empty({b * s, k}, q.options().dtype(at::kInt));
  const int64_t rows = b * s;
  if (rows == 0 || k == 0) return out.view({b, s, k});
  const int64_t cr = chunk_rows(rows, n);
  Tensor buf = at::empty({cr, n}, q.options().dtype(at::kFloat));
  for (int64_t r0 = 0; r0 < rows; r0 += cr) {
    const int64_t nr = std::min(cr, rows - r0);
    run_scores(qc, wc, kk, rb, lim, r0, nr, n, static_cast<int>(h), static_cast<int>(d), buf.data_ptr<float>(), n, op);
    check_launch(v4k_topk_select(buf.data_ptr<float>(), n, lim.data_ptr<int64_t>() + r0, nr, n, static_cast<int>(k),
                                 offset, out.data_ptr<int32_t>() + r0 * k, stream_of(q)),
                 op);
  }
  return out.view({b, s, k});
}

// v4k_cuda::topk_select(scores [R, N] fp32, limits [R] int) -> int32 [R, min(k, N)]
Tensor topk_rows(const Tensor& scores, const Tensor& limits, int64_t k, int64_t offset, const char* op) {
  check_cuda(scores, op, "scores");
  TORCH_CHECK(scores.dim() == 2 && scores.scalar_type() == at::kFloat, "v4k_cuda::", op,
              ": scores must be 2-D float32, got ", scores.sizes(), " ", scores.scalar_type());
  TORCH_CHECK(scores.stride(1) == 1, "v4k_cuda::", op, ": scores rows must be contiguous");
  const int64_t rows = scores.size(0), n = scores.size(1);
  TORCH_CHECK(limits.numel() == rows, "v4k_cuda::", op, ": limits must have ", rows, " entries, got ", limits.numel());
  const int64_t kk = std::min(k, n);
  TORCH_CHECK(kk >= 0 && kk <= V4K_TOPK_MAX, "v4k_cuda::", op, ": k must be in [0, ", V4K_TOPK_MAX, "], got ", kk);
  c10::cuda::CUDAGuard guard(scores.device());
  Tensor lim = limits.to(at::kLong).contiguous();
  Tensor out = at::empty({rows, kk}, scores.options().dtype(at::kInt));
  if (rows == 0 || kk == 0) return out;
  check_launch(v4k_topk_select(scores.data_ptr<float>(), scores.stride(0), lim.data_ptr<int64_t>(), rows, n,
                               static_cast<int>(kk), offset, out.data_ptr<int32_t>(), stream_of(scores)),
               op);
  return out;
}

Tensor topk_select(const Tensor& scores, const Tensor& limits, int64_t k, int64_t offset) {
  return topk_rows(scores, limits, k, offset, "topk_select");
}

// ------------------------------------------------------------------------------ mHC
std::tuple<Tensor, Tensor, Tensor> hc_pre_impl(const Tensor& x, const Tensor& hc_fn, const Tensor& hc_scale,
                                               const Tensor& hc_base, int64_t iters, double norm_eps, double hc_eps,
                                               const Tensor* pre_d, const Tensor* pre_sq, const char* op) {
  check_cuda(x, op, "x");
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t hc = x.size(-2), d = x.size(-1);
  TORCH_CHECK(hc == 4, "v4k_impl::", op, " (cuda): the fused kernel is built for hc_mult = 4, got ", hc);
  const int64_t t = x.numel() / (hc * d);
  Tensor xc = x.contiguous(), fn = f32(hc_fn), sc = f32(hc_scale), bs = f32(hc_base);
  auto lead = x.sizes().slice(0, x.dim() - 2).vec();
  auto with = [&](std::vector<int64_t> tail) {
    auto v = lead;
    v.insert(v.end(), tail.begin(), tail.end());
    return v;
  };
  Tensor x_in = at::empty(with({d}), x.options());
  Tensor post = at::empty(with({hc}), x.options().dtype(at::kFloat));
  Tensor comb = at::empty(with({hc, hc}), x.options().dtype(at::kFloat));
  if (t == 0) return {x_in, post, comb};
  Tensor dd, sq;
  if (pre_d != nullptr) {
    dd = f32(*pre_d);
    sq = f32(*pre_sq);
  }
  check_launch(v4k_hc_pre(xc.data_ptr(), float_code(x, op, "x"), fn.data_ptr<float>(), sc.data_ptr<float>(),
                          bs.data_ptr<float>(), t, static_cast<int>(d), static_cast<int>(iters),
                          static_cast<float>(norm_eps), static_cast<float>(hc_eps),
                          dd.defined() ? dd.data_ptr<float>() : nullptr, sq.defined() ? sq.data_ptr<float>() : nullptr,
                          x_in.data_ptr(), post.data_ptr<float>(), comb.data_ptr<float>(), stream_of(x)),
               op);
  return {x_in, post, comb};
}

std::tuple<Tensor, Tensor, Tensor> hc_pre(const Tensor& x, const Tensor& hc_fn, const Tensor& hc_scale,
                                          const Tensor& hc_base, int64_t iters, double norm_eps, double hc_eps) {
  return hc_pre_impl(x, hc_fn, hc_scale, hc_base, iters, norm_eps, hc_eps, nullptr, nullptr, "hc_pre");
}

// v4k_cuda::hc_pre_apply: hc_pre given d = x . fn^T [T, 24] and sqr_sum [T] from a vendor GEMM
std::tuple<Tensor, Tensor, Tensor> hc_pre_apply(const Tensor& x, const Tensor& d, const Tensor& sqr_sum,
                                                const Tensor& hc_fn, const Tensor& hc_scale, const Tensor& hc_base,
                                                int64_t iters, double norm_eps, double hc_eps) {
  const int64_t t = x.numel() / (x.size(-2) * x.size(-1));
  TORCH_CHECK(d.numel() == t * 24 && sqr_sum.numel() == t, "v4k_cuda::hc_pre_apply: d must be [", t,
              ", 24] and sqr_sum [", t, "], got ", d.sizes(), " and ", sqr_sum.sizes());
  return hc_pre_impl(x, hc_fn, hc_scale, hc_base, iters, norm_eps, hc_eps, &d, &sqr_sum, "hc_pre_apply");
}

Tensor hc_post(const Tensor& x, const Tensor& residual, const Tensor& post, const Tensor& comb, bool bf16_mix) {
  const char* op = "hc_post";
  check_cuda(x, op, "x");
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t hc = residual.size(-2), d = residual.size(-1);
  TORCH_CHECK(hc >= 1 && hc <= 8, "v4k_impl::hc_post (cuda): hc must be in [1, 8], got ", hc);
  TORCH_CHECK(residual.scalar_type() == x.scalar_type(), "v4k_impl::hc_post (cuda): residual dtype ",
              residual.scalar_type(), " must equal x dtype ", x.scalar_type());
  const int64_t t = residual.numel() / (hc * d);
  Tensor xc = x.contiguous(), rc = residual.contiguous(), pc = f32(post), cc = f32(comb);
  Tensor out = at::empty(residual.sizes(), residual.options());
  if (t == 0 || d == 0) return out;
  check_launch(v4k_hc_post(xc.data_ptr(), rc.data_ptr(), pc.data_ptr<float>(), cc.data_ptr<float>(),
                           float_code(x, op, "x"), t, static_cast<int>(hc), static_cast<int>(d), bf16_mix ? 1 : 0,
                           out.data_ptr(), stream_of(x)),
               op);
  return out;
}

// ------------------------------------------------------------------------------ compressor
using Seven = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// Pooling + epilogue + state from the call's projected rows kv_new / sc_new [B*S, W] fp32
// (sc_new already carries ape). `x` gives the activation dtype and the shape [B, S, D].
Seven compress_tail(const Tensor& x, const Tensor& kv_new, const Tensor& sc_new, const Tensor& norm_weight,
                    const Tensor& freqs, const Tensor& pending_kv, const Tensor& pending_score, const Tensor& prev_kv,
                    const Tensor& prev_score, const Tensor& n_tokens, int64_t ratio, c10::string_view quant, double eps,
                    const char* op) {
  const int64_t b = x.size(0), s = x.size(1);
  const int64_t hd = norm_weight.size(0);
  // overlapping (CSA) windows iff the projections carry two halves (W == 2·hd): ratio 4 in V4
  const int overlap = kv_new.size(1) == 2 * hd ? 1 : 0;
  const int rope = static_cast<int>(2 * freqs.size(0));
  int qcode;
  if (quant == "none") {
    qcode = V4K_QUANT_NONE;
  } else if (quant == "fp8") {
    qcode = V4K_QUANT_FP8;
  } else if (quant == "fp4") {
    qcode = V4K_QUANT_FP4;
  } else {
    TORCH_CHECK(false, "v4k_cuda::", op, ": quant must be none/fp8/fp4, got ", std::string(quant));
  }
  TORCH_CHECK(hd <= 2048, "v4k_cuda::", op, ": head_dim must be <= 2048, got ", hd);
  TORCH_CHECK(kv_new.is_contiguous() && sc_new.is_contiguous() && kv_new.scalar_type() == at::kFloat &&
                  sc_new.scalar_type() == at::kFloat && kv_new.size(0) == b * s && sc_new.sizes() == kv_new.sizes(),
              "v4k_cuda::", op, ": kv_new / sc_new must be contiguous float32 [B*S, W]");
  Tensor nw = norm_weight.contiguous();
  Tensor fr = f32(freqs), pk = f32(pending_kv), ps = f32(pending_score), vk = f32(prev_kv), vs = f32(prev_score);
  Tensor nt = n_tokens.to(at::kLong).contiguous();
  void* st = stream_of(x);
  const int xd = float_code(x, op, "x");
  const int64_t nw_rows = (s + ratio - 1) / ratio;
  Tensor entries = at::empty({b, nw_rows, hd}, x.options());
  if (entries.numel() > 0)
    check_launch(v4k_compressor_pool(pk.data_ptr<float>(), ps.data_ptr<float>(), kv_new.data_ptr<float>(),
                                     sc_new.data_ptr<float>(), vk.data_ptr<float>(), vs.data_ptr<float>(),
                                     nt.data_ptr<int64_t>(), nw.data_ptr(), float_code(norm_weight, op, "norm_weight"),
                                     fr.data_ptr<float>(), rope, b, s, static_cast<int>(ratio), static_cast<int>(hd),
                                     overlap, qcode, static_cast<float>(eps), xd, entries.data_ptr(), st),
                 op);
  Tensor npk = at::empty_like(pk), nps = at::empty_like(ps), nvk = at::empty_like(vk), nvs = at::empty_like(vs);
  Tensor num_new = at::empty({b}, x.options().dtype(at::kInt));
  check_launch(v4k_compressor_state(pk.data_ptr<float>(), ps.data_ptr<float>(), kv_new.data_ptr<float>(),
                                    sc_new.data_ptr<float>(), vk.data_ptr<float>(), vs.data_ptr<float>(),
                                    nt.data_ptr<int64_t>(), b, s, static_cast<int>(ratio), static_cast<int>(hd), overlap,
                                    npk.data_ptr<float>(), nps.data_ptr<float>(), nvk.data_ptr<float>(),
                                    nvs.data_ptr<float>(), num_new.data_ptr<int32_t>(), st),
               op);
  return {entries, num_new, npk, nps, nvk, nvs, n_tokens + s};
}

Seven compress_kv(const Tensor& x, const Tensor& wkv, const Tensor& wgate, const Tensor& ape, const Tensor& norm_weight,
                  const Tensor& freqs, const Tensor& pending_kv, const Tensor& pending_score, const Tensor& prev_kv,
                  const Tensor& prev_score, const Tensor& n_tokens, int64_t ratio, c10::string_view quant, double eps,
                  bool hf_rounding) {
  const char* op = "compress_kv";
  check_cuda(x, op, "x");
  // the [HF] roundings to x.dtype are exact for fp32 x, where they equal the default computation
  TORCH_CHECK(!hf_rounding || x.scalar_type() == at::kFloat, "v4k_impl::compress_kv (cuda): hf_rounding needs float32 x");
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t b = x.size(0), s = x.size(1), dm = x.size(2), width = wkv.size(0);
  Tensor xc = x.contiguous(), wk = wkv.contiguous(), wg = wgate.contiguous(), ap = f32(ape);
  Tensor nt = n_tokens.to(at::kLong).contiguous();
  auto fopt = x.options().dtype(at::kFloat);
  Tensor kv_new = at::empty({b * s, width}, fopt), sc_new = at::empty({b * s, width}, fopt);
  void* st = stream_of(x);
  const int xd = float_code(x, op, "x");
  check_launch(v4k_compressor_proj(xc.data_ptr(), xd, wk.data_ptr(), float_code(wkv, op, "wkv"), nullptr,
                                   nt.data_ptr<int64_t>(), b * s, width, dm, std::max<int64_t>(s, 1), static_cast<int>(ratio),
                                   kv_new.data_ptr<float>(), st),
               op);
  check_launch(v4k_compressor_proj(xc.data_ptr(), xd, wg.data_ptr(), float_code(wgate, op, "wgate"), ap.data_ptr<float>(),
                                   nt.data_ptr<int64_t>(), b * s, width, dm, std::max<int64_t>(s, 1), static_cast<int>(ratio),
                                   sc_new.data_ptr<float>(), st),
               op);
  return compress_tail(x, kv_new, sc_new, norm_weight, freqs, pending_kv, pending_score, prev_kv, prev_score, n_tokens,
                       ratio, quant, eps, op);
}

// v4k_cuda::compress_from_proj: the same after a projection computed elsewhere (Triton's kernel)
Seven compress_from_proj(const Tensor& x, const Tensor& kv_new, const Tensor& sc_new, const Tensor& norm_weight,
                         const Tensor& freqs, const Tensor& pending_kv, const Tensor& pending_score,
                         const Tensor& prev_kv, const Tensor& prev_score, const Tensor& n_tokens, int64_t ratio,
                         c10::string_view quant, double eps) {
  check_cuda(x, "compress_from_proj", "x");
  c10::cuda::CUDAGuard guard(x.device());
  return compress_tail(x, kv_new, sc_new, norm_weight, freqs, pending_kv, pending_score, prev_kv, prev_score, n_tokens,
                       ratio, quant, eps, "compress_from_proj");
}

}  // namespace

TORCH_LIBRARY(v4k_cuda, m) {
  m.def("topk_select(Tensor scores, Tensor limits, int k, int offset) -> Tensor");
  m.def("hc_pre_apply(Tensor x, Tensor d, Tensor sqr_sum, Tensor hc_fn, Tensor hc_scale, Tensor hc_base, "
        "int sinkhorn_iters, float norm_eps, float hc_eps) -> (Tensor, Tensor, Tensor)");
  m.def("compress_from_proj(Tensor x, Tensor kv_new, Tensor sc_new, Tensor norm_weight, Tensor freqs, "
        "Tensor pending_kv, Tensor pending_score, Tensor prev_kv, Tensor prev_score, Tensor n_tokens, int ratio, "
        "str quant, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(v4k_cuda, CUDA, m) {
  m.impl("topk_select", &topk_select);
  m.impl("hc_pre_apply", &hc_pre_apply);
  m.impl("compress_from_proj", &compress_from_proj);
}

TORCH_LIBRARY_IMPL(v4k_impl, CUDA, m) {
  m.impl("indexer_scores", &indexer_scores);
  m.impl("indexer_topk", &indexer_topk);
  m.impl("hc_pre", &hc_pre);
  m.impl("hc_post", &hc_post);
  m.impl("compress_kv", &compress_kv);
}

// `import v4kernels._C_cuda` runs the registrations above (static initialisers); the module
// itself exposes nothing.
static struct PyModuleDef v4k_cuda_module = {PyModuleDef_HEAD_INIT, "_C_cuda",
                                             "v4kernels native CUDA kernels (torch.ops.v4k_impl / v4k_cuda)", -1,
                                             nullptr};

PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&v4k_cuda_module); }
