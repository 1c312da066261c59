// Paged decode attention in float32 on the CPU: torch op xfusion::cpu_paged_decode.
//
// One new query token per sequence attends over the sequence's cached keys/values, read in place from the
// paged pool through its block table, and over its own new key/value, passed apart (the engine writes the new
// K/V into the pool after the step: engine/paged_attention.py). The reference it replaces (TorchBackend.decode
// in xfusion_serve/model/attention.py) gathers every sequence's blocks into a padded copy, concatenates the
// new token and masks the padding: on the CPU those copies cost more than the attention itself.
//
// Work item: one (sequence, KV head) pair; its G = Hq / Hkv query heads (GQA) share every key and value read.
//   0. where each token's key and value lie, walking the block table block by block;
//   1. raw scores s[g, t] = q_g . k_t for the cached tokens t < L - 1 and the new one, four tokens at a time
//      (their four sums reduced together: cpu_vec.h's hsum4);
//   2. softmax over t of s / sqrt(d), the maximum subtracted, 16 scores at a time (cpu_vec.h's exp);
//   3. out_g = sum_t p[g, t] v_t, one query head at a time with its sum in registers (heads up to 128 floats).
// The register sums and the vector maximum of step 2, against the sums kept in memory and a scalar maximum,
// at 1, 16 and 64 sequences of 100 and 400 tokens, one thread, the median of 9 paired ratios: 0.99x-1.29x on the
// demo's shape (1.29x at 16 sequences of 100), 1.08x-1.17x on the 135M-class one
// (`benchmarks/bench_cpu_attention.py --against 4bb375c`; README, fifteenth session).
// Keys and values are fetched kAhead tokens before their use: a block holds only block_size tokens, so one
// sequence's reads are short runs the hardware prefetchers barely follow. Dot products and the weighted sum run
// on 16-float GCC vectors (head_dim a multiple of 16; the Python side falls back to the reference otherwise).
// Work items are spread over torch's intra-op threads.
// Against the first version (a division per token to find its block, one horizontal sum per score, std::exp
// per score, no read-ahead): 1.6-2.2x at 16-64 sequences on the demo's and the 135M-class shape, one thread
// (session script, the two built side by side).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu_vec.h"

namespace {

using xfusion_cpu::v16;

inline v16 load(const float* p) { return *reinterpret_cast<const v16*>(p); }

// Tokens ahead whose key or value is fetched while this one is used: the cache reads a token's block by block
// table, so the memory reads of one sequence are short runs the hardware prefetchers barely follow.
constexpr int64_t kAhead = 16;

inline void prefetch(const float* p, int64_t d) {
  for (int64_t i = 0; i < d; i += 16) __builtin_prefetch(p + i, 0, 3);  // 16 floats: one 64-byte cache line
}

inline float dot(const float* __restrict a, const float* __restrict b, int64_t d) {
  v16 acc = v16{};
  for (int64_t i = 0; i < d; i += 16) acc += load(a + i) * load(b + i);
  return xfusion_cpu::hsum(acc);
}

inline void axpy(float alpha, const float* __restrict x, float* __restrict y, int64_t d) {
  for (int64_t i = 0; i < d; i += 16) *reinterpret_cast<v16*>(y + i) += alpha * load(x + i);
}

// out = sum_t p[t] v_t over L tokens, for a head of NV vectors: the sum held in registers, two sets of them
// (even and odd tokens) so that consecutive multiply-adds do not wait on each other; `ahead`: the values kAhead
// tokens on fetched (the first query head's pass; the others find them in the cache). The general path (axpy,
// heads over 128 floats) keeps the sum in memory: a load and a store per vector per token.
template <int NV>
void weighted_sum(const float* __restrict p, const float* const* values, int64_t L, float* __restrict out,
                  bool ahead) {
  v16 even[NV] = {}, odd[NV] = {};
  int64_t t = 0;
  for (; t + 2 <= L; t += 2) {
    if (ahead && t + kAhead + 2 <= L) {
      prefetch(values[t + kAhead], 16 * NV);
      prefetch(values[t + kAhead + 1], 16 * NV);
    }
    const float* a = values[t];
    const float* b = values[t + 1];
    for (int i = 0; i < NV; ++i) {
      even[i] += p[t] * load(a + 16 * i);
      odd[i] += p[t + 1] * load(b + 16 * i);
    }
  }
  if (t < L)
    for (int i = 0; i < NV; ++i) even[i] += p[t] * load(values[t] + 16 * i);
  for (int i = 0; i < NV; ++i) *reinterpret_cast<v16*>(out + 16 * i) = even[i] + odd[i];
}

using WeightedSum = void (*)(const float*, const float* const*, int64_t, float*, bool);

// The weighted sum for a head of d floats, or nullptr where d is over 128 (then the general path).
inline WeightedSum weighted_sum_for(int64_t d) {
  switch (d / 16) {
    case 1: return weighted_sum<1>;
    case 2: return weighted_sum<2>;
    case 3: return weighted_sum<3>;
    case 4: return weighted_sum<4>;
    case 5: return weighted_sum<5>;
    case 6: return weighted_sum<6>;
    case 7: return weighted_sum<7>;
    case 8: return weighted_sum<8>;
    default: return nullptr;
  }
}

// q [B, Hq, d]; kv_cache [2, blocks, block_size, Hkv, d]; block_tables [B, M] int32; seq_lens [B] int32, each
// counting the new token; k_new, v_new [B, Hkv, d] -> [B, Hq, d].
at::Tensor cpu_paged_decode(const at::Tensor& q_in, const at::Tensor& kv_cache, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, const at::Tensor& k_in, const at::Tensor& v_in) {
  TORCH_CHECK(q_in.scalar_type() == at::kFloat && kv_cache.scalar_type() == at::kFloat &&
                  k_in.scalar_type() == at::kFloat && v_in.scalar_type() == at::kFloat,
              "cpu_paged_decode: float32 only");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt,
              "cpu_paged_decode: block_tables and seq_lens must be int32");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2 && kv_cache.is_contiguous(),
              "cpu_paged_decode: kv_cache must be a contiguous [2, blocks, block_size, kv_heads, head_dim]");
  TORCH_CHECK(q_in.dim() == 3 && k_in.dim() == 3 && v_in.dim() == 3, "cpu_paged_decode: q, k and v must be 3-D");
  const int64_t B = q_in.size(0), Hq = q_in.size(1), d = q_in.size(2);
  const int64_t blocks = kv_cache.size(1), bs = kv_cache.size(2), Hkv = kv_cache.size(3);
  TORCH_CHECK(kv_cache.size(4) == d && d % 16 == 0, "cpu_paged_decode: head_dim must match and be a multiple of 16");
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "cpu_paged_decode: query heads must be a multiple of KV heads");
  TORCH_CHECK(k_in.sizes() == v_in.sizes() && k_in.size(0) == B && k_in.size(1) == Hkv && k_in.size(2) == d,
              "cpu_paged_decode: k and v must be [B, kv_heads, head_dim]");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B && seq_lens.numel() == B,
              "cpu_paged_decode: block_tables [B, M] and seq_lens [B]");
  const int64_t G = Hq / Hkv, M = block_tables.size(1);
  // The engine passes head-major views of token-major tensors: any strides but along head_dim, no copy.
  auto rows = [](const at::Tensor& x) { return x.stride(2) == 1 ? x : x.contiguous(); };
  auto q = rows(q_in), k_new = rows(k_in), v_new = rows(v_in);
  auto tables = block_tables.contiguous(), lens = seq_lens.contiguous();
  const int32_t* lp = lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lp[b] >= 1 && lp[b] - 1 <= M * bs, "cpu_paged_decode: seq_lens out of range of the block table");
  const int32_t* tp = tables.data_ptr<int32_t>();
  for (int64_t i = 0; i < B * M; ++i)
    TORCH_CHECK(tp[i] >= 0 && tp[i] < blocks, "cpu_paged_decode: block id out of range");

  auto out = at::empty({B, Hq, d}, q.options());  // contiguous, whatever the strides of q
  const float* qp = q.data_ptr<float>();
  const float* kc = kv_cache.data_ptr<float>();
  const float* vc = kc + blocks * bs * Hkv * d;
  const float* kn = k_new.data_ptr<float>();
  const float* vn = v_new.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), ks0 = k_new.stride(0), ks1 = k_new.stride(1);
  const int64_t vs0 = v_new.stride(0), vs1 = v_new.stride(1);
  const int64_t token_stride = Hkv * d;  // between two tokens of one block

  const WeightedSum sum_of = weighted_sum_for(d);
  at::parallel_for(0, B * Hkv, 4, [&](int64_t w0, int64_t w1) {
    std::vector<float> scores;
    std::vector<const float*> keys, values;
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = w / Hkv, h = w % Hkv, L = lp[b], Lv = (L + 15) / 16 * 16;  // Lv: whole vectors
      // Where each token's key and value are: the cached ones block by block (no division per token), then the
      // new one's.
      const int32_t* table = tp + b * M;
      keys.resize(L);
      values.resize(L);
      for (int64_t t = 0, blk = 0; t < L - 1; ++blk)
        for (int64_t i = 0, base = table[blk] * bs; i < bs && t < L - 1; ++i, ++t) {
          keys[t] = kc + (base + i) * token_stride + h * d;
          values[t] = vc + (base + i) * token_stride + h * d;
        }
      keys[L - 1] = kn + b * ks0 + h * ks1;
      values[L - 1] = vn + b * vs0 + h * vs1;
      scores.assign(G * Lv, -std::numeric_limits<float>::infinity());
      const float* qh = qp + b * qs0 + h * G * qs1;  // this KV head's G query heads, qs1 apart
      // 1. Raw scores q_g . k_t, four tokens at a time: their four sums reduced together.
      int64_t t = 0;
      for (; t + 4 <= L; t += 4) {
        if (t + kAhead + 4 <= L)
          for (int j = 0; j < 4; ++j) prefetch(keys[t + kAhead + j], d);
        for (int64_t g = 0; g < G; ++g) {
          v16 acc[4] = {};
          for (int64_t i = 0; i < d; i += 16) {
            const v16 qv = load(qh + g * qs1 + i);
            for (int j = 0; j < 4; ++j) acc[j] += qv * load(keys[t + j] + i);
          }
          xfusion_cpu::hsum4(acc, scores.data() + g * Lv + t);
        }
      }
      for (; t < L; ++t)
        for (int64_t g = 0; g < G; ++g) scores[g * Lv + t] = dot(qh + g * qs1, keys[t], d);
      // 2. Softmax of the scaled scores, 16 at a time (the padding past L is -inf: exp gives ~0, never read).
      float* oh = op + (b * Hq + h * G) * d;
      for (int64_t g = 0; g < G; ++g) {
        float* s = scores.data() + g * Lv;
        v16 top = load(s);  // the padding past L is -inf: it never wins
        for (int64_t t = 16; t < Lv; t += 16) {
          const v16 x = load(s + t);
          top = x > top ? x : top;
        }
        float mx = top[0];
        for (int i = 1; i < 16; ++i) mx = std::max(mx, top[i]);
        v16 sum = v16{};
        for (int64_t t = 0; t < Lv; t += 16) {
          const v16 e = xfusion_cpu::exp_nonpositive((load(s + t) - mx) * scale);
          *reinterpret_cast<v16*>(s + t) = e;
          sum += e;
        }
        const float inv = 1.f / xfusion_cpu::hsum(sum);
        for (int64_t t = 0; t < Lv; t += 16) *reinterpret_cast<v16*>(s + t) *= inv;
      }
      // 3. out_g = sum_t p[g, t] v_t: one query head at a time, the values read ahead on the first one's pass.
      if (sum_of != nullptr) {
        for (int64_t g = 0; g < G; ++g) sum_of(scores.data() + g * Lv, values.data(), L, oh + g * d, g == 0);
        continue;
      }
      std::fill(oh, oh + G * d, 0.f);
      for (int64_t t = 0; t < L; ++t) {
        if (t + kAhead < L) prefetch(values[t + kAhead], d);
        for (int64_t g = 0; g < G; ++g) axpy(scores[g * Lv + t], values[t], oh + g * d, d);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(xfusion, m) {
  m.def("cpu_paged_decode(Tensor q, Tensor kv_cache, Tensor block_tables, Tensor seq_lens, Tensor k, Tensor v)"
        " -> Tensor");
}

TORCH_LIBRARY_IMPL(xfusion, CPU, m) {
  m.impl("cpu_paged_decode", &cpu_paged_decode);
}
