// Paged decode attention in float32 on the CPU: torch op xfusion::cpu_paged_decode.
//
// One new query token per sequence attends over the sequence's cached keys/values, read in place from the
// paged pool through its block table, and over its own new key/value, passed apart (the engine writes the new
// K/V into the pool after the step: engine/paged_attention.py). The reference it replaces (TorchBackend.decode
// in xfusion_serve/model/attention.py) gathers every sequence's blocks into a padded copy, concatenates the
// new token and masks the padding: on the CPU those copies cost more than the attention itself.
//
// Work item: one (sequence, KV head) pair; its G = Hq / Hkv query heads (GQA) share every key and value read.
//   1. scores s[g, t] = q_g . k_t / sqrt(d) for the cached tokens t < L - 1 (block table) and the new one;
//   2. softmax over t, with the maximum subtracted;
//   3. out_g = sum_t p[g, t] v_t / sum_t p[g, t].
// Dot products and the weighted sum run on 16-float GCC vectors (head_dim a multiple of 16; the Python side
// falls back to the reference otherwise). Work items are spread over torch's intra-op threads.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace {

typedef float v16 __attribute__((vector_size(64), aligned(4)));

inline float dot(const float* __restrict a, const float* __restrict b, int64_t d) {
  v16 acc = v16{};
  for (int64_t i = 0; i < d; i += 16)
    acc += *reinterpret_cast<const v16*>(a + i) * *reinterpret_cast<const v16*>(b + i);
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += acc[i];
  return s;
}

inline void axpy(float alpha, const float* __restrict x, float* __restrict y, int64_t d) {
  for (int64_t i = 0; i < d; i += 16)
    *reinterpret_cast<v16*>(y + i) += alpha * *reinterpret_cast<const v16*>(x + i);
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

  at::parallel_for(0, B * Hkv, 4, [&](int64_t w0, int64_t w1) {
    std::vector<float> scores;
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = w / Hkv, h = w % Hkv, L = lp[b];
      const int32_t* table = tp + b * M;
      scores.assign(G * L, 0.f);
      auto key = [&](int64_t t) {
        return t < L - 1 ? kc + (table[t / bs] * bs + t % bs) * token_stride + h * d : kn + b * ks0 + h * ks1;
      };
      auto value = [&](int64_t t) {
        return t < L - 1 ? vc + (table[t / bs] * bs + t % bs) * token_stride + h * d : vn + b * vs0 + h * vs1;
      };
      const float* qh = qp + b * qs0 + h * G * qs1;  // this KV head's G query heads, qs1 apart
      for (int64_t t = 0; t < L; ++t) {
        const float* kt = key(t);
        for (int64_t g = 0; g < G; ++g) scores[g * L + t] = dot(qh + g * qs1, kt, d) * scale;
      }
      float* oh = op + (b * Hq + h * G) * d;
      for (int64_t g = 0; g < G; ++g) {
        float* s = scores.data() + g * L;
        float mx = s[0];
        for (int64_t t = 1; t < L; ++t) mx = std::max(mx, s[t]);
        float sum = 0.f;
        for (int64_t t = 0; t < L; ++t) sum += (s[t] = std::exp(s[t] - mx));
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < L; ++t) s[t] *= inv;
        std::fill(oh + g * d, oh + (g + 1) * d, 0.f);
      }
      for (int64_t t = 0; t < L; ++t) {
        const float* vt = value(t);
        for (int64_t g = 0; g < G; ++g) axpy(scores[g * L + t], vt, oh + g * d, d);
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
