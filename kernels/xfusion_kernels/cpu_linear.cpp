// y = x @ w^T (+ b) in float32 on the CPU, for the few rows of a decode step: torch op xfusion::cpu_linear.
//
// A decode step multiplies a handful of rows (one per running sequence) by every weight matrix of the model,
// so it streams the weights from memory once and does little arithmetic on each: BLAS libraries tuned for
// large matrices leave much of the memory bandwidth unused there (MKL's sgemm at 4 rows takes twice its time
// at 1). This kernel keeps the weights as transformers stores them ([N, K], row-major: no packed copy) and
// computes dot products along K:
//   - 4 weight rows x up to 4 input rows per tile, 16 accumulators of 16 floats, so each weight vector loaded
//     feeds 4 fused multiply-adds and each input vector 4 more;
//   - up to 48 input rows, where reading the weights bounds it, a tile's 4 weight rows are a quarter of the
//     matrix apart (rows g, g + Q, g + 2Q, g + 3Q with Q = N / 4, rounded down; the last N % 4 rows go one at
//     a time), so that each thread reads the weights as 4 long sequential streams, which the hardware
//     prefetchers follow. Four neighbouring rows (2.3 KB each at the 135M shape) are 4 short streams that
//     start anew every tile and read up to half as fast: all of the 135M shape's multiplies 1.45x / 1.23x /
//     1.18x faster at 1 / 4 / 16 rows on two threads, 1.74x / 1.28x / 1.12x on one
//     (`benchmarks/bench_cpu_linear.py --against 19fc557`; README, fourteenth session). Over 48 rows
//     arithmetic bounds it, and neighbouring rows are better there (strided ones 0.92x-0.97x at 64, a session
//     script; probably because rows a multiple of 4 KB apart, as strided ones often are, share L1 sets).
//     Neighbouring rows prefetch the next 4 (strided ones are not helped by it);
//   - past the first 4 input rows the weights come from the cache and the tile is bound by arithmetic: there
//     every vector is loaded once into a register (GCC otherwise folds the loads into the multiply-adds,
//     reading each vector 4 times: 20 loads for 16 multiply-adds; 1.44x / 1.91x faster at 16 / 64 rows on one
//     thread, 1.14x / 1.24x on two, the 135M shape's blocks);
//   - the 16 accumulators of a tile are reduced 4 at a time (interleave, add, fold the 128-bit lanes);
//   - tiles are spread over torch's intra-op threads, each taking a contiguous range of g.
// Its tiles are inlined by force: left to GCC, the 64-row path ran 0.92x as fast.
// Written with GCC vector extensions, so it compiles for whatever the machine has (-march=native); the
// 4-way reduction uses AVX-512 intrinsics where they exist. Over 64 rows (a prefill) it calls at::linear:
// there a BLAS blocks and packs better than this. Inputs whose K is not a multiple of 16 do too.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "cpu_vec.h"

namespace {

using xfusion_cpu::v16;
constexpr int64_t kMaxRows = 64;  // more rows than this: at::linear
// Up to this many rows a tile's weight rows are a quarter of the matrix apart; over it, neighbours (see above).
constexpr int64_t kMaxStridedRows = 48;

// Keeps v in a register where the compiler would rather fold its load into each instruction that uses it
// (one zmm register: AVX-512 only; elsewhere nothing).
inline void in_register(v16& v) {
#if defined(__x86_64__) && defined(__AVX512F__)
  asm("" : "+v"(v));
#else
  (void)v;
#endif
}

// y[m, r * q] = x[m, :] . (the weight row r * S floats after w) for MT input rows and R weight rows, S floats
// and q output columns apart (kStrided; else neighbours: S = K, q = 1); K a multiple of 16. kPin: every vector
// kept in a register (the passes over cached weights). PF: the R neighbouring rows after these prefetched.
template <int MT, int R, bool kStrided, bool kPin, bool PF>
__attribute__((always_inline)) inline void tile(const float* __restrict x, int64_t K, const float* __restrict w,
                                                int64_t S, float* __restrict y, int64_t ldy, int64_t q) {
  if constexpr (!kStrided) S = K, q = 1;
  v16 acc[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = v16{};
  for (int64_t k = 0; k < K; k += 16) {
    if constexpr (PF)
      for (int r = 0; r < R; ++r) __builtin_prefetch(w + (R + r) * K + k, 0, 3);
    v16 wv[R];
    for (int r = 0; r < R; ++r) {
      wv[r] = *reinterpret_cast<const v16*>(w + r * S + k);
      if constexpr (kPin) in_register(wv[r]);
    }
    for (int m = 0; m < MT; ++m) {
      v16 xv = *reinterpret_cast<const v16*>(x + m * K + k);
      if constexpr (kPin) in_register(xv);
      for (int r = 0; r < R; ++r) acc[m][r] += xv * wv[r];
    }
  }
  for (int m = 0; m < MT; ++m) {
    if constexpr (R == 4 && !kStrided) {
      xfusion_cpu::hsum4(acc[m], y + m * ldy);
    } else if constexpr (R == 4) {
      float sums[4];
      xfusion_cpu::hsum4(acc[m], sums);
      for (int r = 0; r < 4; ++r) y[m * ldy + r * q] = sums[r];
    } else {
      for (int r = 0; r < R; ++r) y[m * ldy + r * q] = xfusion_cpu::hsum(acc[m][r]);
    }
  }
}

// The passes after a row group's first read the weights from the cache: bound by arithmetic, they keep every
// vector in a register. The first, bound by memory, lets GCC fold loads into the multiply-adds (faster there),
// and for neighbouring rows prefetches the next ones.
template <int MT, int R, bool kStrided>
__attribute__((always_inline)) inline void tile_pass(const float* x, int64_t K, const float* w, int64_t S,
                                                     float* y, int64_t N, int64_t q, bool first) {
  if (first) tile<MT, R, kStrided, false, !kStrided>(x, K, w, S, y, N, q);
  else tile<MT, R, kStrided, (MT > 1), false>(x, K, w, S, y, N, q);
}

// Every input row against R weight rows (their outputs: columns of y); see tile for S, q and kStrided.
template <int R, bool kStrided>
void row_group(const float* x, int64_t M, int64_t K, const float* w, int64_t S, float* y, int64_t N, int64_t q) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile_pass<4, R, kStrided>(x + m * K, K, w, S, y + m * N, N, q, m == 0);
  switch (M - m) {
    case 3: tile_pass<3, R, kStrided>(x + m * K, K, w, S, y + m * N, N, q, m == 0); break;
    case 2: tile_pass<2, R, kStrided>(x + m * K, K, w, S, y + m * N, N, q, m == 0); break;
    case 1: tile_pass<1, R, kStrided>(x + m * K, K, w, S, y + m * N, N, q, m == 0); break;
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
  // Tile g: weight rows g, g + Q, g + 2Q and g + 3Q (strided), or 4g to 4g + 3.
  const int64_t Q = N / 4;
  if (M <= kMaxStridedRows) {
    at::parallel_for(0, Q, 8, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) row_group<4, true>(xp, M, K, wp + g * K, Q * K, yp + g, N, Q);
    });
  } else {
    at::parallel_for(0, Q, 8, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) row_group<4, false>(xp, M, K, wp + 4 * g * K, K, yp + 4 * g, N, 1);
    });
  }
  for (int64_t n = 4 * Q; n < N; ++n) row_group<1, true>(xp, M, K, wp + n * K, 0, yp + n, N, 0);
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
