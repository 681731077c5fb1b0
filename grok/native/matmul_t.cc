// y = x @ w_t.T for a few rows of x: the CPU format's decode matmuls, as an XLA FFI custom call.
//
// XLA:CPU's own dot reads an [out, in] float32 weight at memory speed for one row of x, but at
// about half that for 4 to 16 rows. This kernel streams each weight row once for all rows of x:
// it takes two weight rows at a time and up to four rows of x, keeps the eight partial dot
// products in AVX2 registers, and walks `in` in blocks that stay in L1 so that later groups of
// four x rows reuse the weight block from cache. The weight rows are split over XLA's intra-op
// thread pool. Each product is the float32 sum of float32 products (fused multiply-adds), as a
// dot is; only the order of the additions differs from XLA's.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 512;  // floats of `in` per block: 4 x rows + 2 weight rows = 12 KiB
constexpr int64_t kRowsPerTask = 64;  // weight rows per unit of work handed to a thread

float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// acc[r * C + c] (8 partial sums) += x row r . weight row c, over `len` (a multiple of 8) floats. While the last
// group of x rows runs, `prefetch` (the next two weight rows' block, or null) is pulled into L1.
template <int R, int C>
void Block(const float* __restrict x, int64_t x_stride, const float* __restrict w0,
           const float* __restrict w1, int64_t len, float* __restrict acc, const float* prefetch) {
  __m256 a[R * C];
#pragma GCC unroll 8
  for (int i = 0; i < R * C; ++i) a[i] = _mm256_loadu_ps(acc + 8 * i);
  for (int64_t k = 0; k < len; k += 8) {
    if (prefetch) {
      _mm_prefetch(reinterpret_cast<const char*>(prefetch + 2 * k), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(prefetch + 2 * k + 8), _MM_HINT_T0);
    }
    const __m256 v0 = _mm256_loadu_ps(w0 + k);
    const __m256 v1 = _mm256_loadu_ps(w1 + k);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      __m256 xv = _mm256_loadu_ps(x + r * x_stride + k);
      asm("" : "+x"(xv));  // keep xv in a register: loaded once, not once per weight row
      a[r * C] = _mm256_fmadd_ps(xv, v0, a[r * C]);
      if (C == 2) a[r * C + 1] = _mm256_fmadd_ps(xv, v1, a[r * C + 1]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R * C; ++i) _mm256_storeu_ps(acc + 8 * i, a[i]);
}

template <int C>
void AllRows(const float* x, int64_t m, int64_t k_total, const float* w0, const float* w1,
             int64_t start, int64_t len, float* acc, const float* prefetch) {
  for (int64_t r0 = 0; r0 < m; r0 += 4) {
    const float* xr = x + r0 * k_total + start;
    const float* p = r0 + 4 >= m ? prefetch : nullptr;
    float* ar = acc + 8 * r0 * C;
    switch (std::min<int64_t>(m - r0, 4)) {
      case 4: Block<4, C>(xr, k_total, w0, w1, len, ar, p); break;
      case 3: Block<3, C>(xr, k_total, w0, w1, len, ar, p); break;
      case 2: Block<2, C>(xr, k_total, w0, w1, len, ar, p); break;
      default: Block<1, C>(xr, k_total, w0, w1, len, ar, p); break;
    }
  }
}

// y[:, n0:n1] for x [m, k] and w_t [n, k], all row-major.
void Columns(const float* x, int64_t m, int64_t k, const float* w_t, float* y, int64_t n,
             int64_t n0, int64_t n1) {
  const int64_t k8 = k - k % 8;
  std::unique_ptr<float[]> acc(new float[m * 2 * 8]);
  for (int64_t j = n0; j < n1; j += 2) {
    const int c = j + 1 < n1 ? 2 : 1;
    const float* w0 = w_t + j * k;
    const float* w1 = w0 + (c - 1) * k;
    std::fill(acc.get(), acc.get() + m * 2 * 8, 0.0f);
    for (int64_t start = 0; start < k8; start += kBlock) {
      const int64_t len = std::min(kBlock, k8 - start);
      const float* next = j + 2 < n1 ? w_t + (j + 2) * k + 2 * start : nullptr;
      if (c == 2) AllRows<2>(x, m, k, w0 + start, w1 + start, start, len, acc.get(), next);
      else AllRows<1>(x, m, k, w0 + start, w1 + start, start, len, acc.get(), next);
    }
    for (int64_t r = 0; r < m; ++r) {
      for (int i = 0; i < c; ++i) {
        const float* w = w0 + i * k;
        float sum = HorizontalSum(_mm256_loadu_ps(acc.get() + 8 * (r * c + i)));
        for (int64_t t = k8; t < k; ++t) sum += x[r * k + t] * w[t];
        y[r * n + j + i] = sum;
      }
    }
  }
}

// Work shared between the calling thread and tasks on XLA's thread pool: each claims the next
// range of weight rows until none is left. The caller never waits for a task that has not
// started (a pool thread may be busy, or be the caller), only for claimed ranges to finish.
struct Work {
  const float* x;
  const float* w_t;
  float* y;
  int64_t m, k, n, tasks;
  std::atomic<int64_t> next{0}, done{0};

  void Run() {
    for (int64_t t; (t = next.fetch_add(1)) < tasks;) {
      const int64_t n0 = t * kRowsPerTask;
      Columns(x, m, k, w_t, y, n, n0, std::min(n, n0 + kRowsPerTask));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error MatmulT(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w_t,
                   ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w_t.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1]) {
    return ffi::Error::InvalidArgument("grok_matmul_t expects x [m, k] and w_t [n, k]");
  }
  auto work = std::make_shared<Work>();
  work->x = x.typed_data();
  work->w_t = w_t.typed_data();
  work->y = y->typed_data();
  work->m = xd[0];
  work->k = xd[1];
  work->n = wd[0];
  work->tasks = (work->n + kRowsPerTask - 1) / kRowsPerTask;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), work->tasks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->Run(); });
  work->Run();
  while (work->done.load(std::memory_order_acquire) < work->tasks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GrokMatmulT, MatmulT,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
