// KV compressor (SPEC §6): fused projection, incremental window state, softmax pooling of the
// closed windows, RMSNorm, RoPE at position j·ratio and the FP8 / FP4 QAT simulation.
//
// The projections of all tokens of all sequences are one call of the fixed-order panel GEMM
// (gemm.cpp), so a token's fp32 projection is the same whatever the chunking; pooling and the
// post-processing of a window only read that window's rows. Chunked and one-shot calls therefore
// give bit-identical entries and state. The state is written in the reference's canonical form:
// pending slots outside the open window hold kv 0 and score −inf.
#include <algorithm>
#include <memory>

#include "common.h"
#include "kernels.h"

namespace v4k_cpu {

namespace {

// In-place fast Walsh–Hadamard transform in natural (Sylvester) order, then · n^-1/2 (SPEC §4.5).
void hadamard(float* v, int64_t n) {
  for (int64_t h = 1; h < n; h <<= 1)
    for (int64_t i = 0; i < n; i += 2 * h)
      for (int64_t j = i; j < i + h; ++j) {
        const float a = v[j], b = v[j + h];
        v[j] = a + b;
        v[j + h] = a - b;
      }
  const float s = static_cast<float>(1.0 / std::sqrt(static_cast<double>(n)));
  for (int64_t i = 0; i < n; ++i) v[i] *= s;
}

// Pooled fp32 c [hd] -> finished entry values (rounded to dt) in c (SPEC §6.3 after pooling).
void finish_entry(float* c, const CompressArgs& a, int64_t position) {
  const int64_t hd = a.hd, r = 2 * a.nfreq;
  const int dt = a.x_dtype;
  round_through(c, dt, hd);
  // RMSNorm (SPEC §5.1), [OFF] rounding: (x · rsqrt(mean x² + eps)) · w, rounded once
  float ss = 0.f;
  for (int64_t i = 0; i < hd; ++i) ss += c[i] * c[i];
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(hd) + a.eps);
  for (int64_t i = 0; i < hd; ++i) c[i] = c[i] * inv * a.norm_w[i];
  round_through(c, dt, hd);
  // interleaved RoPE on the trailing r dims at the window's first position (SPEC §3.3)
  float* rp = c + hd - r;
  const float pf = static_cast<float>(position);
  for (int64_t i = 0; i < a.nfreq; ++i) {
    const float ang = pf * a.freqs[i];
    float cs = std::cos(ang), sn = std::sin(ang);
    if (a.hf_rounding) {  // [HF]: the cos/sin tables are cast to the model dtype first
      round_through(&cs, dt, 1);
      round_through(&sn, dt, 1);
    }
    const float x0 = rp[2 * i], x1 = rp[2 * i + 1];
    rp[2 * i] = x0 * cs - x1 * sn;
    rp[2 * i + 1] = x0 * sn + x1 * cs;
  }
  round_through(rp, dt, r);
  if (a.quant == 1) {
    fp8_roundtrip_pow2(c, hd - r, 64);  // nope dims only (SPEC §4.3)
    round_through(c, dt, hd - r);
  } else if (a.quant == 2) {
    hadamard(c, hd);
    round_through(c, dt, hd);
    fp4_roundtrip(c, hd, 32);
    round_through(c, dt, hd);
  }
}

}  // namespace

void compress_kv(const CompressArgs& a) {
  const int64_t B = a.B, S = a.S, D = a.D, hd = a.hd, m = a.ratio;
  const bool overlap = a.overlap;
  const int64_t W = (overlap ? 2 : 1) * hd, W2 = 2 * W;
  const int64_t R = (S + m - 1) / m;
  const int xes = elem_size(a.x_dtype);
  const float ninf = -std::numeric_limits<float>::infinity();

  // fp32 projections [B·S, 2W]: kv columns then score columns (SPEC §6.2)
  // uninitialised (every element is written below before it is read): no serial zero fill
  std::unique_ptr<float[]> xf_buf(new float[B * S * D]), proj_buf(new float[B * S * W2]);
  float* const xf = xf_buf.get();
  float* const proj = proj_buf.get();
#pragma omp parallel for schedule(static) if (B * S * D > (int64_t(1) << 18))
  for (int64_t t = 0; t < B * S; ++t) load_row(static_cast<const char*>(a.x) + t * D * xes, a.x_dtype, xf + t * D, D);
  const GemmJob jobs[2] = {{xf, B * S, D, a.wkv, 0, proj, W2}, {xf, B * S, D, a.wgate, 0, proj + W, W2}};
  gemm_panels(jobs, 2);
  // [HF]: the kv / gate projections are nn.Linear outputs in the model dtype (before the bias)
  if (a.hf_rounding) round_through(proj, a.x_dtype, B * S * W2);
  std::vector<int64_t> nwin(B), first(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n0 = a.n_tokens[b], k = n0 % m;
    for (int64_t i = 0; i < S; ++i) {
      float* sc = proj + (b * S + i) * W2 + W;
      const float* ape = a.ape + ((n0 + i) % m) * W;
      for (int64_t c = 0; c < W; ++c) sc[c] += ape[c];
    }
    nwin[b] = (k + S) / m;
    first[b + 1] = first[b] + nwin[b];
  }
  // Timeline row r of sequence b (positions from the open window's start): pending row r for
  // r < k, else projected token r − k.
  auto kv_row = [&](int64_t b, int64_t r) -> const float* {
    const int64_t k = a.n_tokens[b] % m;
    return r < k ? a.pkv_in + (b * m + r) * W : proj + (b * S + r - k) * W2;
  };
  auto sc_row = [&](int64_t b, int64_t r) -> const float* {
    const int64_t k = a.n_tokens[b] % m;
    return r < k ? a.psc_in + (b * m + r) * W : proj + (b * S + r - k) * W2 + W;
  };

  std::fill(static_cast<char*>(a.entries), static_cast<char*>(a.entries) + B * R * hd * xes, 0);
  const int64_t total = first[B];
#pragma omp parallel if (total > 1)
  {
    std::vector<float> c(hd), mx(hd), den(hd), wgt(hd);
    std::vector<const float*> kvs(2 * m), scs(2 * m);
#pragma omp for schedule(dynamic, 1)
    for (int64_t q = 0; q < total; ++q) {
      int64_t b = 0;
      while (first[b + 1] <= q) ++b;
      const int64_t w = q - first[b], n0 = a.n_tokens[b], j = (n0 - n0 % m) / m + w;
      // slots of window j (SPEC §6.3): CSA = Ca/Za of window j−1 (none for j = 0) then Cb/Zb of
      // window j; HCA = the window's m rows
      int ns = 0;
      if (overlap) {
        if (j > 0)
          for (int64_t s = 0; s < m; ++s) {
            kvs[ns] = w > 0 ? kv_row(b, (w - 1) * m + s) : a.vkv_in + (b * m + s) * hd;
            scs[ns++] = w > 0 ? sc_row(b, (w - 1) * m + s) : a.vsc_in + (b * m + s) * hd;
          }
        for (int64_t s = 0; s < m; ++s) {
          kvs[ns] = kv_row(b, w * m + s) + hd;
          scs[ns++] = sc_row(b, w * m + s) + hd;
        }
      } else {
        for (int64_t s = 0; s < m; ++s) {
          kvs[ns] = kv_row(b, w * m + s);
          scs[ns++] = sc_row(b, w * m + s);
        }
      }
      // channel-wise softmax over the slots: c = Σ_s kv_s · (e_s / Σ e), e_s = exp(z_s − max z)
      std::fill(mx.begin(), mx.end(), ninf);
      for (int s = 0; s < ns; ++s)
        for (int64_t d = 0; d < hd; ++d) mx[d] = std::max(mx[d], scs[s][d]);
      std::fill(den.begin(), den.end(), 0.f);
      for (int s = 0; s < ns; ++s)
        for (int64_t d = 0; d < hd; ++d) den[d] += std::exp(scs[s][d] - mx[d]);
      std::fill(c.begin(), c.end(), 0.f);
      if (a.hf_rounding) {
        // [HF] pooling: Σ dtype(dtype(kv) · dtype(softmax_fp32)), summed in fp32 (rounded in finish_entry)
        const int dt = a.x_dtype;
        for (int s = 0; s < ns; ++s)
          for (int64_t d = 0; d < hd; ++d) {
            float p = std::exp(scs[s][d] - mx[d]) / den[d], kv = kvs[s][d];
            round_through(&p, dt, 1);
            round_through(&kv, dt, 1);
            float prod = kv * p;
            round_through(&prod, dt, 1);
            c[d] += prod;
          }
      } else {
        for (int s = 0; s < ns; ++s)
          for (int64_t d = 0; d < hd; ++d) c[d] += kvs[s][d] * (std::exp(scs[s][d] - mx[d]) / den[d]);
      }
      finish_entry(c.data(), a, j * m);
      store_row(c.data(), a.x_dtype, static_cast<char*>(a.entries) + ((b * R + w) * hd) * xes, hd);
    }
  }
  // new state: pending rows of the open window, the last closed window's Ca/Za, counters
  for (int64_t b = 0; b < B; ++b) {
    const int64_t k = a.n_tokens[b] % m, nw = nwin[b], rem = k + S - nw * m;
    for (int64_t s = 0; s < m; ++s) {
      float* pk = a.pkv_out + (b * m + s) * W;
      float* ps = a.psc_out + (b * m + s) * W;
      if (s < rem) {
        std::memcpy(pk, kv_row(b, nw * m + s), W * 4);
        std::memcpy(ps, sc_row(b, nw * m + s), W * 4);
      } else {
        std::fill(pk, pk + W, 0.f);
        std::fill(ps, ps + W, ninf);
      }
    }
    if (overlap) {
      for (int64_t s = 0; s < m; ++s) {
        const float* vk = nw > 0 ? kv_row(b, (nw - 1) * m + s) : a.vkv_in + (b * m + s) * hd;
        const float* vs = nw > 0 ? sc_row(b, (nw - 1) * m + s) : a.vsc_in + (b * m + s) * hd;
        std::memcpy(a.vkv_out + (b * m + s) * hd, vk, hd * 4);
        std::memcpy(a.vsc_out + (b * m + s) * hd, vs, hd * 4);
      }
    }
    a.num_new[b] = static_cast<int32_t>(nw);
    a.n_tokens_out[b] = a.n_tokens[b] + S;
  }
}

}  // namespace v4k_cpu
