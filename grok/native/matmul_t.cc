// y = x @ w_t.T for a few rows of x: the CPU format's decode matmuls, as an XLA FFI custom call.
// Leading batch dimensions, shared by x and w_t, give one such product per batch element (the
// attention logits of a decode step: each sequence's and head's queries times its cached keys);
// a second entry point, GrokGroupedMatmulT, runs the ragged product of a mixture of experts (rows
// grouped by expert, each group times its own expert's weight).
//
// XLA:CPU's own dot reads an [out, in] float32 weight at memory speed for one row of x, but at
// about half that for 4 to 16 rows. This kernel streams each weight row once for all rows of x:
// it takes three weight rows at a time and up to four rows of x, keeps the twelve partial dot
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
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRows = 4;  // rows of x per register block
constexpr int64_t kCols = 3;  // weight rows per register block: kRows * kCols = 12 accumulators
constexpr int64_t kBlock = 512;  // floats of `in` per block: kRows x rows + kCols weight rows = 14 KiB
constexpr int64_t kRowsPerTask = 96;  // weight rows per unit of work handed to a thread (kCols | it)
// x's rows are copied kPad floats beyond `in` apart: with `in` a multiple of 1024 (as in Grok),
// rows a multiple of 4 KiB apart all fall in the same L1 sets and evict each other (measured: the
// in-cache rate drops from 52 to 36 GFLOP/s per core).
constexpr int64_t kPad = 16;

float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// acc[r * C + c] (8 partial sums) += x row r . weight row c, over `len` (a multiple of 8) floats;
// weight row c starts at w + c * w_stride. (The hardware prefetcher streams the weight rows:
// software prefetching measured no faster for `in` = 2048 and 10-15% slower for `in` = 10928.)
template <int R, int C>
void Block(const float* __restrict x, int64_t x_stride, const float* __restrict w, int64_t w_stride,
           int64_t len, float* __restrict acc) {
  __m256 a[R * C];
#pragma GCC unroll 16
  for (int i = 0; i < R * C; ++i) a[i] = _mm256_loadu_ps(acc + 8 * i);
  for (int64_t k = 0; k < len; k += 8) {
    __m256 v[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) v[c] = _mm256_loadu_ps(w + c * w_stride + k);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      __m256 xv = _mm256_loadu_ps(x + r * x_stride + k);
      asm("" : "+x"(xv));  // keep xv in a register: loaded once, not once per weight row
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) a[r * C + c] = _mm256_fmadd_ps(xv, v[c], a[r * C + c]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < R * C; ++i) _mm256_storeu_ps(acc + 8 * i, a[i]);
}

template <int C>
void AllRows(const float* x, int64_t x_stride, int64_t m, int64_t k, const float* w, int64_t start,
             int64_t len, float* acc) {
  for (int64_t r0 = 0; r0 < m; r0 += kRows) {
    const float* xr = x + r0 * x_stride + start;
    float* ar = acc + 8 * r0 * C;
    switch (std::min<int64_t>(m - r0, kRows)) {
      case 4: Block<4, C>(xr, x_stride, w + start, k, len, ar); break;
      case 3: Block<3, C>(xr, x_stride, w + start, k, len, ar); break;
      case 2: Block<2, C>(xr, x_stride, w + start, k, len, ar); break;
      default: Block<1, C>(xr, x_stride, w + start, k, len, ar); break;
    }
  }
}

// y[:, n0:n1] for x [m, k] (rows x_stride apart) and w_t [n, k], row-major: kCols weight rows at
// a time.
void Columns(const float* x, int64_t x_stride, int64_t m, int64_t k, const float* w_t, float* y,
             int64_t n, int64_t n0, int64_t n1) {
  const int64_t k8 = k - k % 8;
  std::unique_ptr<float[]> acc(new float[m * kCols * 8]);
  for (int64_t j = n0; j < n1; j += kCols) {
    const int c = static_cast<int>(std::min(kCols, n1 - j));
    const float* w = w_t + j * k;
    std::fill(acc.get(), acc.get() + m * c * 8, 0.0f);
    for (int64_t start = 0; start < k8; start += kBlock) {
      const int64_t len = std::min(kBlock, k8 - start);
      switch (c) {
        case 3: AllRows<3>(x, x_stride, m, k, w, start, len, acc.get()); break;
        case 2: AllRows<2>(x, x_stride, m, k, w, start, len, acc.get()); break;
        default: AllRows<1>(x, x_stride, m, k, w, start, len, acc.get()); break;
      }
    }
    for (int64_t r = 0; r < m; ++r) {
      for (int i = 0; i < c; ++i) {
        float sum = HorizontalSum(_mm256_loadu_ps(acc.get() + 8 * (r * c + i)));
        for (int64_t t = k8; t < k; ++t) sum += x[r * x_stride + t] * w[i * k + t];
        y[r * n + j + i] = sum;
      }
    }
  }
}

// One product of a job: m rows of x (kPad floats beyond `in` apart) times a weight [n, in], into
// m rows of y (n floats apart).
struct Product {
  const float* x;
  int64_t m;
  const float* w_t;
  float* y;
};

// Products sharing `in` and n, shared between the calling thread and tasks on XLA's thread pool:
// each claims the next unit (one product's range of weight rows) until none is left. The caller
// never waits for a task that has not started (a pool thread may be busy, or be the caller), only
// for claimed units to finish.
struct Work {
  std::vector<float> x;  // all rows of x, kPad floats apart (see kPad)
  std::vector<Product> products;
  int64_t k, n, per_product, tasks;
  std::atomic<int64_t> next{0}, done{0};

  Work(const float* x_rows, int64_t rows, int64_t k, int64_t n) : x(rows * (k + kPad)), k(k), n(n) {
    for (int64_t r = 0; r < rows; ++r) std::copy_n(x_rows + r * k, k, x.data() + r * (k + kPad));
    per_product = (n + kRowsPerTask - 1) / kRowsPerTask;
  }

  // Rows [first, first + m) of x times w_t, into y (rows n floats apart).
  void Add(int64_t first, int64_t m, const float* w_t, float* y) {
    products.push_back({x.data() + first * (k + kPad), m, w_t, y});
  }

  void Run() {
    for (int64_t t; (t = next.fetch_add(1)) < tasks;) {
      const Product& p = products[t / per_product];
      const int64_t n0 = t % per_product * kRowsPerTask;
      Columns(p.x, k + kPad, p.m, k, p.w_t, p.y, n, n0, std::min(n, n0 + kRowsPerTask));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Runs every product of `work`, on the calling thread and as many pool threads as can help.
void RunAll(ffi::ThreadPool& pool, std::shared_ptr<Work> work) {
  work->tasks = static_cast<int64_t>(work->products.size()) * work->per_product;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), work->tasks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->Run(); });
  work->Run();
  while (work->done.load(std::memory_order_acquire) < work->tasks) std::this_thread::yield();
}

// y[..., m, n] = x[..., m, k] @ w_t[..., n, k].T, one product per element of the shared leading
// dimensions.
ffi::Error MatmulT(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w_t,
                   ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w_t.dimensions();
  const size_t rank = xd.size();
  if (rank < 2 || wd.size() != rank || xd[rank - 1] != wd[rank - 1] ||
      !std::equal(xd.begin(), xd.end() - 2, wd.begin())) {
    return ffi::Error::InvalidArgument("grok_matmul_t expects x [..., m, k] and w_t [..., n, k]");
  }
  const int64_t m = xd[rank - 2], k = xd[rank - 1], n = wd[rank - 2];
  if (k == 0) std::fill_n(y->typed_data(), y->element_count(), 0.0f);  // empty sums
  if (y->element_count() == 0 || k == 0) return ffi::Error::Success();
  auto work = std::make_shared<Work>(x.typed_data(), x.element_count() / k, k, n);
  for (int64_t b = 0; b < static_cast<int64_t>(x.element_count()) / (m * k); ++b) {
    work->Add(b * m, m, w_t.typed_data() + b * n * k, y->typed_data() + b * m * n);
  }
  RunAll(pool, work);
  return ffi::Error::Success();
}

// The ragged product of a mixture of experts: x's rows [r, k] come grouped by expert, group e
// (group_sizes[e] rows, in order) times expert e's weight [n, k]; rows past the groups are zero.
// A weight whose group is empty is not read.
ffi::Error GroupedMatmulT(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> group_sizes,
                          ffi::RemainingArgs weights, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const int64_t experts = static_cast<int64_t>(group_sizes.element_count());
  if (xd.size() != 2 || group_sizes.dimensions().size() != 1 || static_cast<int64_t>(weights.size()) != experts) {
    return ffi::Error::InvalidArgument("grok_grouped_matmul_t expects x [r, k], group_sizes [e] and e weights");
  }
  const int64_t rows = xd[0], k = xd[1], n = y->dimensions()[1];
  std::vector<const float*> w(experts);
  int64_t total = 0;
  for (int64_t e = 0; e < experts; ++e) {
    auto weight = weights.get<ffi::Buffer<ffi::F32>>(e);
    if (!weight.has_value()) return weight.error();
    const auto wd = weight->dimensions();
    const int32_t size = group_sizes.typed_data()[e];
    if (wd.size() != 2 || wd[0] != n || wd[1] != k || size < 0 || (total += size) > rows) {
      return ffi::Error::InvalidArgument("grok_grouped_matmul_t: a weight is not [n, k] or the groups exceed x's rows");
    }
    w[e] = weight->typed_data();
  }
  const int64_t computed = k == 0 ? 0 : total;  // rows past it are zero (all of them: empty sums)
  std::fill_n(y->typed_data() + computed * n, (rows - computed) * n, 0.0f);
  if (computed == 0 || n == 0) return ffi::Error::Success();
  auto work = std::make_shared<Work>(x.typed_data(), total, k, n);
  for (int64_t e = 0, first = 0; e < experts; first += group_sizes.typed_data()[e++]) {
    const int64_t m = group_sizes.typed_data()[e];
    if (m > 0) work->Add(first, m, w[e], y->typed_data() + first * n);
  }
  RunAll(pool, work);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GrokMatmulT, MatmulT,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GrokGroupedMatmulT, GroupedMatmulT,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>());
