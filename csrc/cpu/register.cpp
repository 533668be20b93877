// torch.library bindings of the native CPU kernels: namespace v4k_cpu (never v4k — the Python
// registry is the single chooser; v4kernels/ops/<family>/cpu.py calls these ops).
//
// Every op re-checks the few facts its raw-pointer kernel relies on (the public wrappers have
// already validated shapes and index ranges), makes inputs contiguous and allocates outputs.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "kernels.h"

namespace {

using at::Tensor;

int float_code(const Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return 0;
    case at::kBFloat16:
      return 1;
    case at::kHalf:
      return 2;
    default:
      TORCH_CHECK(false, "v4k_cpu::", op, ": ", name, " must be float32/bfloat16/float16, got ", t.scalar_type());
  }
  return -1;
}

void check_cpu(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "v4k_cpu::", op, ": ", name, " must be a CPU tensor, got ", t.device());
}

// Scales may arrive as fp32 or UE8M0 (float8_e8m0fnu); the kernels read fp32.
Tensor scales_f32(const Tensor& s) { return s.to(at::kFloat).contiguous(); }

// ------------------------------------------------------------------------------ attention
Tensor sparse_attn(const Tensor& q, const Tensor& kv, const Tensor& attn_sink, const Tensor& topk_idxs,
                   double softmax_scale) {
  const char* op = "sparse_attn";
  for (auto* p : {&q, &kv, &attn_sink, &topk_idxs}) check_cpu(*p, op, "inputs");
  TORCH_CHECK(q.dim() == 4, "v4k_cpu::sparse_attn: q must be [B,M,H,D], got ", q.sizes());
  const int64_t B = q.size(0), M = q.size(1), H = q.size(2), D = q.size(3);
  const int qd = float_code(q, op, "q");
  TORCH_CHECK(D >= 1, "v4k_cpu::sparse_attn: head dim must be >= 1, got ", D);
  TORCH_CHECK(kv.dim() == 3 && kv.size(0) == B, "v4k_cpu::sparse_attn: kv must be [B,N,D], got ", kv.sizes());
  int kind;
  if (kv.scalar_type() == at::kByte) {
    TORCH_CHECK(kv.size(2) == v4k_cpu::kPackedRowBytes && D == 512,
                "v4k_cpu::sparse_attn: packed FP8 kv must be uint8 [B,N,584] with D=512, got ", kv.sizes());
    kind = v4k_cpu::KV_FP8_PACKED;
  } else {
    TORCH_CHECK(kv.scalar_type() == q.scalar_type() && kv.size(2) == D,
                "v4k_cpu::sparse_attn: kv must be ", q.scalar_type(), " [B,N,", D, "], got ", kv.scalar_type(), " ", kv.sizes());
    kind = qd;
  }
  TORCH_CHECK(attn_sink.numel() == H && attn_sink.scalar_type() == at::kFloat,
              "v4k_cpu::sparse_attn: attn_sink must be float32 [H=", H, "]");
  TORCH_CHECK(topk_idxs.dim() == 3 && topk_idxs.size(0) == B && topk_idxs.size(1) == M &&
                  topk_idxs.scalar_type() == at::kInt,
              "v4k_cpu::sparse_attn: topk_idxs must be int32 [B,M,K], got ", topk_idxs.scalar_type(), " ", topk_idxs.sizes());
  auto qc = q.contiguous();
  auto kvc = kv.contiguous();
  auto sc = attn_sink.contiguous();
  auto ic = topk_idxs.contiguous();
  auto out = at::empty_like(qc);
  if (out.numel() == 0) return out;
  v4k_cpu::sparse_attn(qc.data_ptr(), qd, kvc.data_ptr(), kind, sc.data_ptr<float>(), ic.data_ptr<int32_t>(),
                       static_cast<float>(softmax_scale), out.data_ptr(), B, M, H, D, kv.size(1), ic.size(2));
  return out;
}


// ------------------------------------------------------------------------------ indexer
struct IndexerArgs {
  Tensor q, w, keys, scales, pos;
  int qd, wd, kind;
  int64_t B, S, HI, dI, N;
};

IndexerArgs indexer_args(const char* op, const Tensor& q, const Tensor& weights, const Tensor& keys,
                         const c10::optional<Tensor>& key_scales, const Tensor& positions, int64_t ratio) {
  IndexerArgs a;
  for (auto* p : {&q, &weights, &keys, &positions}) check_cpu(*p, op, "inputs");
  TORCH_CHECK(q.dim() == 4, "v4k_cpu::", op, ": q must be [B,S,HI,dI], got ", q.sizes());
  a.B = q.size(0), a.S = q.size(1), a.HI = q.size(2), a.dI = q.size(3);
  a.qd = float_code(q, op, "q");
  a.wd = float_code(weights, op, "weights");
  TORCH_CHECK(weights.dim() == 3 && weights.size(0) == a.B && weights.size(1) == a.S && weights.size(2) == a.HI,
              "v4k_cpu::", op, ": weights must be [B,S,HI], got ", weights.sizes());
  TORCH_CHECK(keys.dim() == 3 && keys.size(0) == a.B, "v4k_cpu::", op, ": keys must be [B,N,*], got ", keys.sizes());
  a.N = keys.size(1);
  TORCH_CHECK(ratio >= 1, "v4k_cpu::", op, ": ratio must be >= 1, got ", ratio);
  TORCH_CHECK(positions.dim() == 2 && positions.size(0) == a.B && positions.size(1) == a.S,
              "v4k_cpu::", op, ": positions must be [B,S], got ", positions.sizes());
  if (keys.scalar_type() == at::kFloat8_e4m3fn) {
    TORCH_CHECK(keys.size(2) == a.dI && a.dI % 128 == 0 && key_scales.has_value() &&
                    key_scales->numel() == a.B * a.N * (a.dI / 128),
                "v4k_cpu::", op, ": e4m3 keys need keys [B,N,dI] (dI % 128 == 0) and key_scales [B,N,dI/128]");
    a.kind = v4k_cpu::KEY_FP8;
    a.scales = scales_f32(*key_scales);
  } else if (keys.scalar_type() == at::kByte) {
    TORCH_CHECK(keys.size(2) * 2 == a.dI && a.dI % 32 == 0 && key_scales.has_value() &&
                    key_scales->numel() == a.B * a.N * (a.dI / 32),
                "v4k_cpu::", op, ": FP4 keys need packed keys [B,N,dI/2] and key_scales [B,N,dI/32]");
    a.kind = v4k_cpu::KEY_FP4;
    a.scales = scales_f32(*key_scales);
  } else {
    TORCH_CHECK(keys.size(2) == a.dI, "v4k_cpu::", op, ": keys must be [B,N,", a.dI, "], got ", keys.sizes());
    a.kind = float_code(keys, op, "keys");
  }
  a.q = q.contiguous();
  a.w = weights.contiguous();
  a.keys = keys.contiguous();
  a.pos = positions.to(at::kLong).contiguous();
  return a;
}

Tensor indexer_scores(const Tensor& q, const Tensor& weights, const Tensor& keys, const c10::optional<Tensor>& key_scales,
                      const Tensor& positions, int64_t ratio) {
  auto a = indexer_args("indexer_scores", q, weights, keys, key_scales, positions, ratio);
  auto out = at::empty({a.B, a.S, a.N}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  v4k_cpu::indexer(a.q.data_ptr(), a.qd, a.w.data_ptr(), a.wd, a.keys.data_ptr(), a.kind,
                   a.scales.defined() ? a.scales.data_ptr<float>() : nullptr, a.pos.data_ptr<int64_t>(), a.B, a.S,
                   a.HI, a.dI, a.N, ratio, out.data_ptr<float>(), nullptr, 0, 0);
  return out;
}

Tensor indexer_topk(const Tensor& q, const Tensor& weights, const Tensor& keys, const c10::optional<Tensor>& key_scales,
                    const Tensor& positions, int64_t topk, int64_t ratio, int64_t offset) {
  auto a = indexer_args("indexer_topk", q, weights, keys, key_scales, positions, ratio);
  TORCH_CHECK(topk >= 0, "v4k_cpu::indexer_topk: topk must be >= 0, got ", topk);
  const int64_t kout = std::min(topk, a.N);
  auto out = at::empty({a.B, a.S, kout}, q.options().dtype(at::kInt));
  if (out.numel() == 0) return out;
  v4k_cpu::indexer(a.q.data_ptr(), a.qd, a.w.data_ptr(), a.wd, a.keys.data_ptr(), a.kind,
                   a.scales.defined() ? a.scales.data_ptr<float>() : nullptr, a.pos.data_ptr<int64_t>(), a.B, a.S,
                   a.HI, a.dI, a.N, ratio, nullptr, out.data_ptr<int32_t>(), kout, offset);
  return out;
}


// ------------------------------------------------------------------------------ mhc
std::tuple<Tensor, Tensor, Tensor> hc_split_sinkhorn(const Tensor& mixes, const Tensor& hc_scale, const Tensor& hc_base,
                                                     int64_t hc_mult, int64_t sinkhorn_iters, double eps) {
  const int64_t nm = (2 + hc_mult) * hc_mult;
  TORCH_CHECK(mixes.dim() >= 1 && mixes.size(-1) == nm, "v4k_cpu::hc_split_sinkhorn: mixes must be [..., ", nm, "], got ",
              mixes.sizes());
  TORCH_CHECK(hc_scale.numel() == 3 && hc_base.numel() == nm, "v4k_cpu::hc_split_sinkhorn: hc_scale [3], hc_base [", nm, "]");
  auto m = mixes.to(at::kFloat).contiguous();
  auto sc = hc_scale.to(at::kFloat).contiguous();
  auto bs = hc_base.to(at::kFloat).contiguous();
  auto lead = mixes.sizes().slice(0, mixes.dim() - 1).vec();
  const int64_t T = m.numel() / nm;
  auto v = lead;
  v.push_back(hc_mult);
  auto pre = at::empty(v, m.options()), post = at::empty(v, m.options());
  v.push_back(hc_mult);
  auto comb = at::empty(v, m.options());
  if (T > 0)
    v4k_cpu::hc_split_sinkhorn(m.data_ptr<float>(), sc.data_ptr<float>(), bs.data_ptr<float>(), T, hc_mult,
                               sinkhorn_iters, static_cast<float>(eps), pre.data_ptr<float>(), post.data_ptr<float>(),
                               comb.data_ptr<float>());
  return {pre, post, comb};
}

std::tuple<Tensor, Tensor, Tensor> hc_pre(const Tensor& x, const Tensor& hc_fn, const Tensor& hc_scale,
                                          const Tensor& hc_base, int64_t sinkhorn_iters, double norm_eps,
                                          double hc_eps) {
  TORCH_CHECK(x.dim() >= 2, "v4k_cpu::hc_pre: x must be [..., hc, D], got ", x.sizes());
  const int64_t hc = x.size(-2), D = x.size(-1), nm = (2 + hc) * hc;
  TORCH_CHECK(hc_fn.dim() == 2 && hc_fn.size(0) == nm && hc_fn.size(1) == hc * D, "v4k_cpu::hc_pre: hc_fn must be [", nm,
              ", ", hc * D, "], got ", hc_fn.sizes());
  TORCH_CHECK(hc_scale.numel() == 3 && hc_base.numel() == nm, "v4k_cpu::hc_pre: hc_scale [3], hc_base [", nm, "]");
  const int xd = float_code(x, "hc_pre", "x");
  auto xc = x.contiguous();
  auto fn = hc_fn.to(at::kFloat).contiguous();
  auto sc = hc_scale.to(at::kFloat).contiguous();
  auto bs = hc_base.to(at::kFloat).contiguous();
  auto lead = x.sizes().slice(0, x.dim() - 2).vec();
  const int64_t T = D > 0 && hc > 0 ? xc.numel() / (hc * D) : 0;
  auto v = lead;
  v.push_back(D);
  auto x_in = at::empty(v, x.options());
  v.back() = hc;
  auto fopt = x.options().dtype(at::kFloat);
  auto post = at::empty(v, fopt);
  v.push_back(hc);
  auto comb = at::empty(v, fopt);
  if (T > 0)
    v4k_cpu::hc_pre(xc.data_ptr(), xd, fn.data_ptr<float>(), sc.data_ptr<float>(), bs.data_ptr<float>(), T, hc, D,
                    sinkhorn_iters, static_cast<float>(norm_eps), static_cast<float>(hc_eps), x_in.data_ptr(),
                    post.data_ptr<float>(), comb.data_ptr<float>());
  return {x_in, post, comb};
}

Tensor hc_post(const Tensor& x, const Tensor& residual, const Tensor& post, const Tensor& comb, bool bf16_mix) {
  TORCH_CHECK(residual.dim() >= 2 && residual.dim() == x.dim() + 1, "v4k_cpu::hc_post: residual must be [..., hc, D]");
  const int64_t hc = residual.size(-2), D = residual.size(-1);
  TORCH_CHECK(hc <= 64, "v4k_cpu::hc_post: at most 64 streams, got ", hc);
  TORCH_CHECK(x.size(-1) == D && residual.scalar_type() == x.scalar_type(),
              "v4k_cpu::hc_post: x [..., D] and residual [..., hc, D] must share D and dtype");
  const int xd = float_code(x, "hc_post", "x");
  auto xc = x.contiguous(), rc = residual.contiguous();
  auto pc = post.to(at::kFloat).contiguous(), cc = comb.to(at::kFloat).contiguous();
  const int64_t T = hc * D > 0 ? rc.numel() / (hc * D) : 0;
  TORCH_CHECK(pc.numel() == T * hc && cc.numel() == T * hc * hc, "v4k_cpu::hc_post: post [..., hc], comb [..., hc, hc]");
  auto out = at::empty_like(rc);
  if (T > 0)
    v4k_cpu::hc_post(xc.data_ptr(), xd, rc.data_ptr(), pc.data_ptr<float>(), cc.data_ptr<float>(), T, hc, D, bf16_mix,
                     out.data_ptr());
  return out;
}

// ------------------------------------------------------------------------------ GEMMs
// A [M,K] e4m3 + a_s [M, ceil(K/128)] -> fp32 [M,K]
Tensor dequant_act_fp8(const Tensor& a, const Tensor& a_s) {
  const int64_t M = a.size(0), K = a.size(1);
  auto s = scales_f32(a_s).repeat_interleave(128, 1).narrow(1, 0, K);
  return a.to(at::kFloat) * s;
}

Tensor weight_gemm(const Tensor& af, const v4k_cpu::WeightView& w, int64_t e) {
  const int64_t M = af.size(0);
  auto out = at::empty({M, w.rows}, af.options());
  if (M == 0 || w.rows == 0) return out;
  if (M >= 32) {  // compute bound: decode once to fp32 and use ATen's fp32 GEMM
    auto wf = at::empty({w.rows, w.cols}, af.options());
    v4k_cpu::dequant_weight(w, e, wf.data_ptr<float>());
    at::mm_out(out, af, wf.t());
  } else {  // memory bound: decode each weight row once, right before use
    v4k_cpu::weight_gemm_small(af.data_ptr<float>(), M, w, e, out.data_ptr<float>());
  }
  return out;
}

Tensor fp8_gemm(const Tensor& a, const Tensor& a_s, const Tensor& b, const Tensor& b_s, at::ScalarType out_dtype) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1) && a.scalar_type() == at::kFloat8_e4m3fn &&
                  b.scalar_type() == at::kFloat8_e4m3fn,
              "v4k_cpu::fp8_gemm: a [M,K] and b [N,K] must be float8_e4m3fn");
  const int64_t N = b.size(0), K = b.size(1);
  TORCH_CHECK(b_s.numel() == ((N + 127) / 128) * ((K + 127) / 128), "v4k_cpu::fp8_gemm: b_s must be [ceil(N/128), ceil(K/128)]");
  auto af = dequant_act_fp8(a.contiguous(), a_s).contiguous();
  auto bc = b.contiguous();
  auto bs = scales_f32(b_s);
  v4k_cpu::WeightView w{bc.data_ptr(), bs.data_ptr<float>(), v4k_cpu::W_FP8, N, K};
  return weight_gemm(af, w, 0).to(out_dtype);
}

Tensor fp4_gemm(const Tensor& a, const Tensor& a_s, const Tensor& b, const Tensor& b_s, at::ScalarType out_dtype) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == 2 * b.size(1) && a.scalar_type() == at::kFloat8_e4m3fn,
              "v4k_cpu::fp4_gemm: a [M,K] e4m3 and b [N,K/2] packed");
  const int64_t N = b.size(0), K = a.size(1);
  TORCH_CHECK(K % 32 == 0 && b_s.numel() == N * (K / 32), "v4k_cpu::fp4_gemm: b_s must be [N, K/32]");
  auto af = dequant_act_fp8(a.contiguous(), a_s).contiguous();
  auto bc = b.contiguous().view(at::kByte);
  auto bs = scales_f32(b_s);
  v4k_cpu::WeightView w{bc.data_ptr(), bs.data_ptr<float>(), v4k_cpu::W_FP4, N, K};
  return weight_gemm(af, w, 0).to(out_dtype);
}

// ------------------------------------------------------------------------------ grouped_linear
// x [B,S,G,Din] float, weight [G,Dout,Din] float (any of fp32/bf16/fp16) -> [B,S,G,Dout] x.dtype.
Tensor grouped_linear(const Tensor& x, const Tensor& weight) {
  const char* op = "grouped_linear";
  check_cpu(x, op, "x");
  check_cpu(weight, op, "weight");
  TORCH_CHECK(x.dim() == 4, "v4k_cpu::grouped_linear: x must be [B,S,G,Din], got ", x.sizes());
  const int64_t B = x.size(0), S = x.size(1), G = x.size(2), K = x.size(3);
  TORCH_CHECK(weight.dim() == 3 && weight.size(0) == G && weight.size(2) == K,
              "v4k_cpu::grouped_linear: weight must be [G=", G, ", Dout, Din=", K, "], got ", weight.sizes());
  const int xd = float_code(x, op, "x"), wd = float_code(weight, op, "weight");
  const int64_t N = weight.size(1);
  auto xc = x.contiguous();
  auto wc = weight.contiguous();
  auto out = at::empty({B, S, G, N}, x.options());
  if (out.numel() == 0) return out;
  v4k_cpu::grouped_linear(xc.data_ptr(), xd, wc.data_ptr(), wd, B * S, G, K, N, out.data_ptr());
  return out;
}

// ------------------------------------------------------------------------------ moe
// An expert weight stack [E, rows, cols] (FP4: [E, rows, cols/2] packed) in its storage format,
// with the contiguous tensors it points into kept alive.
struct OwnedWeight {
  Tensor data, scales;
  v4k_cpu::WeightView view;
};

OwnedWeight expert_weight(const Tensor& w, const c10::optional<Tensor>& w_s, const char* name) {
  TORCH_CHECK(w.dim() == 3, "v4k_cpu::moe_experts: ", name, " must be [E, rows, cols], got ", w.sizes());
  check_cpu(w, "moe_experts", name);
  OwnedWeight o;
  const int64_t E = w.size(0), R = w.size(1);
  const auto st = w.scalar_type();
  if (st == at::kFloat8_e4m3fn) {
    const int64_t C = w.size(2);
    TORCH_CHECK(w_s.has_value() && w_s->numel() == E * ((R + 127) / 128) * ((C + 127) / 128),
                "v4k_cpu::moe_experts: e4m3 ", name, " needs scales [E, ceil(rows/128), ceil(cols/128)]");
    o.data = w.contiguous();
    o.scales = scales_f32(*w_s);
    o.view = {o.data.data_ptr(), o.scales.data_ptr<float>(), v4k_cpu::W_FP8, R, C};
  } else if (st == at::kByte || st == at::kChar || st == at::kFloat4_e2m1fn_x2) {
    const int64_t C = 2 * w.size(2);
    TORCH_CHECK(C % 32 == 0 && w_s.has_value() && w_s->numel() == E * R * (C / 32),
                "v4k_cpu::moe_experts: packed FP4 ", name, " needs scales [E, rows, cols/32]");
    o.data = w.contiguous().view(at::kByte);
    o.scales = scales_f32(*w_s);
    o.view = {o.data.data_ptr(), o.scales.data_ptr<float>(), v4k_cpu::W_FP4, R, C};
  } else {
    o.data = w.contiguous();
    o.view = {o.data.data_ptr(), nullptr, float_code(w, "moe_experts", name), R, w.size(2)};
  }
  return o;
}

Tensor moe_experts(const Tensor& x, const Tensor& topk_weights, const Tensor& topk_ids, const Tensor& w1,
                   const c10::optional<Tensor>& w1_s, const Tensor& w3, const c10::optional<Tensor>& w3_s,
                   const Tensor& w2, const c10::optional<Tensor>& w2_s, double swiglu_limit, bool weight_after_w2,
                   at::ScalarType out_dtype) {
  for (auto* p : {&x, &topk_weights, &topk_ids}) check_cpu(*p, "moe_experts", "inputs");
  TORCH_CHECK(x.dim() == 2, "v4k_cpu::moe_experts: x must be [T, D], got ", x.sizes());
  const int64_t T = x.size(0), D = x.size(1);
  const int xd = float_code(x, "moe_experts", "x");
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == T && topk_ids.scalar_type() == at::kInt &&
                  topk_weights.sizes() == topk_ids.sizes(),
              "v4k_cpu::moe_experts: topk_ids int32 [T, k] and topk_weights [T, k], got ", topk_ids.sizes(), " ",
              topk_weights.sizes());
  const int64_t k = topk_ids.size(1);
  TORCH_CHECK(k <= 64, "v4k_cpu::moe_experts: at most 64 experts per token, got ", k);
  auto o1 = expert_weight(w1, w1_s, "w1"), o3 = expert_weight(w3, w3_s, "w3"), o2 = expert_weight(w2, w2_s, "w2");
  const int64_t E = w1.size(0), I = o1.view.rows;
  TORCH_CHECK(o1.view.cols == D && o3.view.rows == I && o3.view.cols == D && o2.view.rows == D && o2.view.cols == I &&
                  w3.size(0) == E && w2.size(0) == E,
              "v4k_cpu::moe_experts: w1, w3 must be [E, I, D] and w2 [E, D, I]");
  for (const auto* o : {&o1, &o3, &o2})
    TORCH_CHECK(o->view.scales == nullptr || o->view.cols % 128 == 0,
                "v4k_cpu::moe_experts: quantised weights need an input dim that is a multiple of 128 (act_quant)");
  auto out = at::empty({T, D}, x.options().dtype(at::kFloat));
  if (T == 0 || D == 0) return out.to(out_dtype);
  auto xc = x.contiguous();
  auto wc = topk_weights.to(at::kFloat).contiguous();
  auto ic = topk_ids.contiguous();
  {
    const int32_t* ids = ic.data_ptr<int32_t>();
    for (int64_t i = 0; i < ic.numel(); ++i)
      TORCH_CHECK(ids[i] >= -1 && ids[i] < E, "v4k_cpu::moe_experts: expert id ", ids[i], " outside [-1, ", E, ")");
  }
  if (I == 0) return out.zero_().to(out_dtype);
  v4k_cpu::moe_experts(xc.data_ptr(), xd, wc.data_ptr<float>(), ic.data_ptr<int32_t>(), T, D, k, o1.view, o3.view,
                       o2.view, E, I, static_cast<float>(swiglu_limit), weight_after_w2, out.data_ptr<float>());
  return out_dtype == at::kFloat ? out : out.to(out_dtype);
}

// ------------------------------------------------------------------------------ compressor
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> compress_kv(
    const Tensor& x, const Tensor& wkv, const Tensor& wgate, const Tensor& ape, const Tensor& norm_weight,
    const Tensor& freqs, const Tensor& pending_kv, const Tensor& pending_score, const Tensor& prev_kv,
    const Tensor& prev_score, const Tensor& n_tokens, int64_t ratio, c10::string_view quant, double eps) {
  const char* op = "compress_kv";
  for (auto* p : {&x, &wkv, &wgate, &ape, &norm_weight, &freqs, &pending_kv, &pending_score, &prev_kv, &prev_score,
                  &n_tokens})
    check_cpu(*p, op, "inputs");
  TORCH_CHECK(x.dim() == 3, "v4k_cpu::compress_kv: x must be [B, S, D], got ", x.sizes());
  const int64_t B = x.size(0), S = x.size(1), D = x.size(2), hd = norm_weight.numel();
  TORCH_CHECK(ratio >= 1, "v4k_cpu::compress_kv: ratio must be >= 1, got ", ratio);
  // overlapping (CSA) windows are recognised by the doubled projection width, wkv [2·hd, D]
  const bool overlap = hd > 0 && wkv.dim() == 2 && wkv.size(0) == 2 * hd;
  const int64_t coff = overlap ? 2 : 1, W = coff * hd, nf = freqs.numel();
  TORCH_CHECK(wkv.dim() == 2 && wkv.size(0) == W && wkv.size(1) == D && wgate.sizes() == wkv.sizes(),
              "v4k_cpu::compress_kv: wkv and wgate must be [", W, ", ", D, "], got ", wkv.sizes(), " ", wgate.sizes());
  TORCH_CHECK(ape.numel() == ratio * W, "v4k_cpu::compress_kv: ape must be [", ratio, ", ", W, "]");
  TORCH_CHECK(2 * nf <= hd, "v4k_cpu::compress_kv: 2*len(freqs) must be <= head dim");
  TORCH_CHECK(pending_kv.numel() == B * ratio * W && pending_score.numel() == B * ratio * W &&
                  pending_kv.scalar_type() == at::kFloat && pending_score.scalar_type() == at::kFloat,
              "v4k_cpu::compress_kv: pending state must be float32 [B, ratio, coff*hd]");
  TORCH_CHECK(prev_kv.numel() == (coff == 2 ? B * ratio * hd : 0) && prev_score.numel() == prev_kv.numel() &&
                  prev_kv.scalar_type() == at::kFloat && prev_score.scalar_type() == at::kFloat,
              "v4k_cpu::compress_kv: prev state must be float32 [B, ratio, hd] (CSA) or empty");
  TORCH_CHECK(n_tokens.numel() == B && n_tokens.scalar_type() == at::kLong, "v4k_cpu::compress_kv: n_tokens int64 [B]");
  int qc;
  if (quant == "none") qc = 0;
  else if (quant == "fp8") qc = 1;
  else if (quant == "fp4") qc = 2;
  else TORCH_CHECK(false, "v4k_cpu::compress_kv: quant must be none/fp8/fp4, got ", std::string(quant));
  TORCH_CHECK(qc != 1 || (hd - 2 * nf) % 64 == 0, "v4k_cpu::compress_kv: fp8 needs (hd - rope dims) % 64 == 0");
  TORCH_CHECK(qc != 2 || (hd > 0 && (hd & (hd - 1)) == 0 && hd % 32 == 0),
              "v4k_cpu::compress_kv: fp4 needs a power-of-two head dim >= 32");
  const int xd = float_code(x, op, "x");
  auto xc = x.contiguous(), wk = wkv.contiguous(), wg = wgate.contiguous();
  auto apef = ape.to(at::kFloat).contiguous(), nw = norm_weight.to(at::kFloat).contiguous();
  auto fr = freqs.to(at::kFloat).contiguous();
  auto pk = pending_kv.contiguous(), ps = pending_score.contiguous(), vk = prev_kv.contiguous(),
       vs = prev_score.contiguous(), nt = n_tokens.contiguous();
  auto entries = at::empty({B, (S + ratio - 1) / ratio, hd}, x.options());
  auto num_new = at::empty({B}, n_tokens.options().dtype(at::kInt));
  auto pko = at::empty_like(pk), pso = at::empty_like(ps), vko = at::empty_like(vk), vso = at::empty_like(vs);
  auto nto = at::empty_like(nt);
  v4k_cpu::CompressArgs a{};
  a.x = xc.data_ptr();
  a.x_dtype = xd;
  a.B = B, a.S = S, a.D = D, a.hd = hd, a.ratio = ratio, a.nfreq = nf;
  a.overlap = overlap;
  a.wkv = {wk.data_ptr(), nullptr, float_code(wk, op, "wkv"), W, D};
  a.wgate = {wg.data_ptr(), nullptr, float_code(wg, op, "wgate"), W, D};
  a.ape = apef.data_ptr<float>();
  a.norm_w = nw.data_ptr<float>();
  a.freqs = fr.data_ptr<float>();
  a.pkv_in = pk.data_ptr<float>(), a.psc_in = ps.data_ptr<float>();
  a.vkv_in = vk.data_ptr<float>(), a.vsc_in = vs.data_ptr<float>();
  a.n_tokens = nt.data_ptr<int64_t>();
  a.quant = qc;
  a.eps = static_cast<float>(eps);
  a.entries = entries.data_ptr();
  a.num_new = num_new.data_ptr<int32_t>();
  a.pkv_out = pko.data_ptr<float>(), a.psc_out = pso.data_ptr<float>();
  a.vkv_out = vko.data_ptr<float>(), a.vsc_out = vso.data_ptr<float>();
  a.n_tokens_out = nto.data_ptr<int64_t>();
  if (B > 0) v4k_cpu::compress_kv(a);
  return {entries, num_new, pko, pso, vko, vso, nto};
}

Tensor hc_head(const Tensor& x, const Tensor& hc_fn, const Tensor& hc_scale, const Tensor& hc_base, double norm_eps,
               double hc_eps) {
  TORCH_CHECK(x.dim() >= 2, "v4k_cpu::hc_head: x must be [..., hc, D], got ", x.sizes());
  const int64_t hc = x.size(-2), D = x.size(-1);
  TORCH_CHECK(hc_fn.dim() == 2 && hc_fn.size(0) == hc && hc_fn.size(1) == hc * D, "v4k_cpu::hc_head: hc_fn must be [",
              hc, ", ", hc * D, "], got ", hc_fn.sizes());
  TORCH_CHECK(hc_scale.numel() >= 1 && hc_base.numel() == hc, "v4k_cpu::hc_head: hc_scale [1], hc_base [", hc, "]");
  const int xd = float_code(x, "hc_head", "x");
  auto xc = x.contiguous();
  auto fn = hc_fn.to(at::kFloat).contiguous();
  auto sc = hc_scale.to(at::kFloat).contiguous();
  auto bs = hc_base.to(at::kFloat).contiguous();
  auto v = x.sizes().slice(0, x.dim() - 2).vec();
  v.push_back(D);
  auto out = at::empty(v, x.options());
  const int64_t T = D > 0 && hc > 0 ? xc.numel() / (hc * D) : 0;
  if (T > 0)
    v4k_cpu::hc_head(xc.data_ptr(), xd, fn.data_ptr<float>(), sc.data_ptr<float>(), bs.data_ptr<float>(), T, hc, D,
                     static_cast<float>(norm_eps), static_cast<float>(hc_eps), out.data_ptr());
  else
    out.zero_();
  return out;
}

}  // namespace

TORCH_LIBRARY(v4k_cpu, m) {
  m.def("sparse_attn(Tensor q, Tensor kv, Tensor attn_sink, Tensor topk_idxs, float softmax_scale) -> Tensor");
  m.def("indexer_scores(Tensor q, Tensor weights, Tensor keys, Tensor? key_scales, Tensor positions, int ratio) -> Tensor");
  m.def("indexer_topk(Tensor q, Tensor weights, Tensor keys, Tensor? key_scales, Tensor positions, int topk, int ratio, int offset) -> Tensor");
  m.def("hc_split_sinkhorn(Tensor mixes, Tensor hc_scale, Tensor hc_base, int hc_mult, int sinkhorn_iters, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("hc_pre(Tensor x, Tensor hc_fn, Tensor hc_scale, Tensor hc_base, int sinkhorn_iters, float norm_eps, float hc_eps) -> (Tensor, Tensor, Tensor)");
  m.def("hc_post(Tensor x, Tensor residual, Tensor post, Tensor comb, bool bf16_mix) -> Tensor");
  m.def("fp8_gemm(Tensor a, Tensor a_s, Tensor b, Tensor b_s, ScalarType out_dtype) -> Tensor");
  m.def("fp4_gemm(Tensor a, Tensor a_s, Tensor b, Tensor b_s, ScalarType out_dtype) -> Tensor");
  m.def("moe_experts(Tensor x, Tensor topk_weights, Tensor topk_ids, Tensor w1, Tensor? w1_s, Tensor w3, Tensor? w3_s, Tensor w2, Tensor? w2_s, float swiglu_limit, bool weight_after_w2, ScalarType out_dtype) -> Tensor");
  m.def("compress_kv(Tensor x, Tensor wkv, Tensor wgate, Tensor ape, Tensor norm_weight, Tensor freqs, Tensor pending_kv, Tensor pending_score, Tensor prev_kv, Tensor prev_score, Tensor n_tokens, int ratio, str quant, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("grouped_linear(Tensor x, Tensor weight) -> Tensor");
  m.def("hc_head(Tensor x, Tensor hc_fn, Tensor hc_scale, Tensor hc_base, float norm_eps, float hc_eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(v4k_cpu, CPU, m) {
  m.impl("sparse_attn", &sparse_attn);
  m.impl("indexer_scores", &indexer_scores);
  m.impl("indexer_topk", &indexer_topk);
  m.impl("hc_split_sinkhorn", &hc_split_sinkhorn);
  m.impl("hc_pre", &hc_pre);
  m.impl("hc_post", &hc_post);
  m.impl("fp8_gemm", &fp8_gemm);
  m.impl("fp4_gemm", &fp4_gemm);
  m.impl("moe_experts", &moe_experts);
  m.impl("compress_kv", &compress_kv);
  m.impl("hc_head", &hc_head);
  m.impl("grouped_linear", &grouped_linear);
}

// A minimal Python module so `import v4kernels._C_cpu` loads the library (and runs the
// registrations above); no pybind11 (SPEC-independent build-time choice, see TOOLCHAIN.md).
static struct PyModuleDef v4k_cpu_module = {PyModuleDef_HEAD_INIT, "_C_cpu",
                                            "v4kernels native CPU kernels (torch.ops.v4k_cpu)", -1, nullptr};

#ifndef V4K_CPU_ISA
#define V4K_CPU_ISA "unknown"
#endif

// The vector ISA this library was compiled for must exist on the running CPU; refuse to load
// (a readable ImportError, surfaced by `python -m v4kernels info`) instead of faulting later.
static const char* missing_isa() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
#if defined(__AVX512F__)
  if (!__builtin_cpu_supports("avx512f")) return "avx512f";
#endif
#if defined(__AVX512BW__)
  if (!__builtin_cpu_supports("avx512bw")) return "avx512bw";
#endif
#if defined(__AVX512VL__)
  if (!__builtin_cpu_supports("avx512vl")) return "avx512vl";
#endif
#if defined(__AVX512DQ__)
  if (!__builtin_cpu_supports("avx512dq")) return "avx512dq";
#endif
#if defined(__AVX2__)
  if (!__builtin_cpu_supports("avx2")) return "avx2";
#endif
#if defined(__FMA__)
  if (!__builtin_cpu_supports("fma")) return "fma";
#endif
#endif
  return nullptr;
}

PyMODINIT_FUNC PyInit__C_cpu(void) {
  if (const char* m = missing_isa()) {
    PyErr_Format(PyExc_ImportError,
                 "v4kernels._C_cpu was compiled for the %s vector ISA but this CPU lacks %s; reinstall on this "
                 "machine or with V4K_CPU_ISA=baseline",
                 V4K_CPU_ISA, m);
    return nullptr;
  }
  return PyModule_Create(&v4k_cpu_module);
}
