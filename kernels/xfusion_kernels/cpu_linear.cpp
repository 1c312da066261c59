// y = x @ w^T (+ b) in float32 on the CPU, for the few rows of a decode step: torch op xfusion::cpu_linear.
//
// A decode step multiplies a handful of rows (one per running sequence) by every weight matrix of the model,
// so it streams the weights from memory once and does little arithmetic on each: BLAS libraries tuned for
// large matrices leave much of the memory bandwidth unused there (MKL's sgemm at 4 rows takes twice its time
// at 1). This kernel keeps the weights as transformers stores them ([N, K], row-major: no packed copy) and
// computes dot products along K:
//   - 4 weight rows x up to 4 input rows per tile, 16 accumulators of 16 floats, so each weight vector loaded
//     feeds 4 fused multiply-adds and each input vector 4 more;
//   - the next 4 weight rows are prefetched while the current ones are used, so reading memory overlaps
//     computing (without it the kernel waited on memory half the time);
//   - past the first 4 input rows the weights come from the cache and the tile is bound by arithmetic: there
//     every vector is loaded once into a register (GCC otherwise folds the loads into the multiply-adds,
//     reading each vector 4 times: 20 loads for 16 multiply-adds; 1.44x / 1.91x faster at 16 / 64 rows on one
//     thread, 1.14x / 1.24x on two, the 135M shape's blocks);
//   - the 16 accumulators of a tile are reduced 4 at a time (interleave, add, fold the 128-bit lanes);
//   - tiles of 4 weight rows are spread over torch's intra-op threads.
// Written with GCC vector extensions, so it compiles for whatever the machine has (-march=native); the
// 4-way reduction uses AVX-512 intrinsics where they exist. Over 64 rows (a prefill) it calls at::linear:
// there a BLAS blocks and packs better than this. Inputs whose K is not a multiple of 16 do too.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "cpu_vec.h"

namespace {

using xfusion_cpu::v16;
constexpr int64_t kMaxRows = 64;  // more rows than this: at::linear

// Keeps v in a register where the compiler would rather fold its load into each instruction that uses it
// (one zmm register: AVX-512 only; elsewhere nothing).
inline void in_register(v16& v) {
#if defined(__x86_64__) && defined(__AVX512F__)
  asm("" : "+v"(v));
#else
  (void)v;
#endif
}

// y[m, r] = x[m, :] . w[r, :] for MT input rows and R weight rows; K a multiple of 16. With PF the next R
// weight rows are prefetched, which only the first pass over a row group needs (later ones hit the cache).
template <int MT, int R, bool PF>
inline void tile(const float* __restrict x, int64_t K, const float* __restrict w, float* __restrict y,
                 int64_t ldy) {
  // The passes after a row group's first read the weights from the cache: bound by arithmetic, they keep every
  // vector in a register. The first, bound by memory, lets GCC fold loads into the multiply-adds (faster there).
  constexpr bool kPin = MT > 1 && !PF;
  v16 acc[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = v16{};
  for (int64_t k = 0; k < K; k += 16) {
    if (PF)
      for (int r = 0; r < R; ++r) __builtin_prefetch(w + (R + r) * K + k, 0, 3);
    v16 wv[R];
    for (int r = 0; r < R; ++r) {
      wv[r] = *reinterpret_cast<const v16*>(w + r * K + k);
      if constexpr (kPin) in_register(wv[r]);
    }
    for (int m = 0; m < MT; ++m) {
      v16 xv = *reinterpret_cast<const v16*>(x + m * K + k);
      if constexpr (kPin) in_register(xv);
      for (int r = 0; r < R; ++r) acc[m][r] += xv * wv[r];
    }
  }
  for (int m = 0; m < MT; ++m) {
    if constexpr (R == 4) {
      xfusion_cpu::hsum4(acc[m], y + m * ldy);
    } else {
      for (int r = 0; r < R; ++r) y[m * ldy + r] = xfusion_cpu::hsum(acc[m][r]);
    }
  }
}

template <int MT, int R>
inline void tile_pass(const float* x, int64_t K, const float* w, float* y, int64_t N, bool first) {
  if (first) tile<MT, R, true>(x, K, w, y, N);
  else tile<MT, R, false>(x, K, w, y, N);
}

// Every input row against R weight rows (their outputs: columns of y).
template <int R>
void row_group(const float* x, int64_t M, int64_t K, const float* w, float* y, int64_t N) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile_pass<4, R>(x + m * K, K, w, y + m * N, N, m == 0);
  switch (M - m) {
    case 3: tile_pass<3, R>(x + m * K, K, w, y + m * N, N, m == 0); break;
    case 2: tile_pass<2, R>(x + m * K, K, w, y + m * N, N, m == 0); break;
    case 1: tile_pass<1, R>(x + m * K, K, w, y + m * N, N, m == 0); break;
  }
}

at::Tensor cpu_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  const int64_t K = x.size(-1), N = w.size(0);
  const int64_t M = K ? x.numel() / K : 0;
  if (x.scalar_type() != at::kFloat || w.scalar_type() != at::kFloat || M > kMaxRows || K % 16 || M == 0 ||
      w.dim() != 2 || w.size(1) != K) {
    return at::linear(x, w, b);
  }
  auto x2 = x.reshape({M, K}).contiguous();
  auto wc = w.contiguous();
  auto y = at::empty({M, N}, x.options());
  const float* xp = x2.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t groups = N / 4;
  at::parallel_for(0, groups, 8, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) row_group<4>(xp, M, K, wp + g * 4 * K, yp + g * 4, N);
  });
  for (int64_t n = groups * 4; n < N; ++n) row_group<1>(xp, M, K, wp + n * K, yp + n, N);
  if (b.has_value() && b->defined()) y.add_(*b);
  auto shape = x.sizes().vec();
  shape.back() = N;
  return y.view(shape);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(xfusion, m) {
  m.def("cpu_linear(Tensor x, Tensor w, Tensor? b=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(xfusion, CPU, m) {
  m.impl("cpu_linear", &cpu_linear);
}
