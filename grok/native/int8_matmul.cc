// Products with the released 8-bit weights on the CPU, read as they are stored (int8 [in, out] and
// bf16 scales [blocks, out]), as XLA FFI custom calls:
// - GrokInt8Matmul: rows of x (bf16 or f32 values) times one or more 8-bit weights, the rows
//   grouped by weight (one group per expert of a mixture, or a single group);
// - GrokBf16MatmulT: rows of bf16 x times a bf16 table [out, in] transposed (the tied output
//   projection over the embedding table).
//
// Numbers (GROK1.md): a weight's value is bf16(bf16(int8) * bf16 scale), the product rounded to
// bf16; a product is the f32 sum of the exact f32 products of those values with x's. Only the
// order of the f32 additions differs from XLA's dot. The kernels widen int8 weights in registers,
// scale them and round them to bf16, once per call:
// - a group of a few rows (decoding) walks its weight in slabs of rows across every column,
//   multiplying each pair of weight rows straight from registers (`Int8SlabAvx512`);
// - more rows (prefill, large batches) take column tiles: each chunk of a tile is dequantized into
//   a packed panel that stays in L1 while every row of x reads it (`Int8UnitAvx512Bf16`, ...).
//
// Three instruction sets, chosen by the caller (`isa` attribute):
//   2 AVX-512 with BF16: bf16 pairs (rows i, i + 1 of a column in one 32-bit lane) for vdpbf16ps,
//     32 multiply-adds per instruction; f32 x is split into three bf16 rows that sum to it exactly
//     (a few rows), or multiplied with an f32 panel by FMAs (many rows);
//   1 AVX2 + FMA: an f32 panel and FMAs (x converted to f32 once);
//   0 portable C++ (the same f32 panel, whatever the compiler makes of the loops).
// Work is split over XLA's intra-op thread pool, at most `threads` threads (0: the whole pool).
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GROK_X86 1
#endif

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// kAvx512 multiplies bf16 pairs (vdpbf16ps); kAvx512Fma rounds the same way but multiplies in f32
// with FMAs, for CPUs whose vdpbf16ps is slow: on a Xeon (Emerald Rapids) one costs four FMAs, so
// the two FMAs that replace it cost half (GrokBf16DotCost measures it; Python chooses).
enum Isa : int32_t { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Fma = 3 };

// Up to this many rows of f32 x (decoding), AVX-512 splits each into three bf16 rows, whose sum it
// is exactly, and runs them on the bf16 pair panels: three vdpbf16ps per two weight rows cost less
// than converting every weight back to f32 for FMAs. With more rows the products dominate and f32
// FMAs (two per two weight rows) win.
constexpr int64_t kSplitRows = 16;
// Up to this many rows, a group's product walks its weight in slabs of rows (`Int8SlabAvx512`,
// `Int8SlabAvx512Fma`); beyond, in column tiles that reuse each dequantized tile for every row.
// With FMAs, slabs take up to 6 rows in registers and up to kFmaSlabRows through an L1 panel:
// column tiles (strided reads) were 1.1-2.5x slower up to 32 rows on a Xeon.
constexpr int64_t kSlabRows = 3, kFmaSlabRows = 32;

// ---------------------------------------------------------------------------------------------
// bf16 <-> f32
// ---------------------------------------------------------------------------------------------

inline float Bf16ToF32(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// f32 -> bf16 bits, rounding to nearest even (the values here are finite).
inline uint16_t F32ToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

inline float RoundToBf16(float f) { return Bf16ToF32(F32ToBf16(f)); }

// ---------------------------------------------------------------------------------------------
// Threads: units of work claimed from a shared counter by the caller and pool threads.
// ---------------------------------------------------------------------------------------------

struct Tasks {
  std::function<void(int64_t)> run;
  int64_t count;
  std::atomic<int64_t> next{0}, done{0};

  void Work() {
    for (int64_t t; (t = next.fetch_add(1)) < count;) {
      run(t);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Runs run(0..count-1) on the calling thread and up to threads - 1 pool threads (threads 0: as
// many as the pool has). The caller waits only for claimed units, never for a task not started.
void ParallelFor(ffi::ThreadPool& pool, int64_t threads, int64_t count, std::function<void(int64_t)> run) {
  if (count <= 0) return;
  auto tasks = std::make_shared<Tasks>();
  tasks->run = std::move(run);
  tasks->count = count;
  const int64_t limit = threads > 0 ? std::min<int64_t>(threads, pool.num_threads()) : pool.num_threads();
  const int64_t helpers = std::min<int64_t>(limit, count) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([tasks] { tasks->Work(); });
  tasks->Work();
  while (tasks->done.load(std::memory_order_acquire) < count) std::this_thread::yield();
}

// ---------------------------------------------------------------------------------------------
// The 8-bit product
// ---------------------------------------------------------------------------------------------

// One call: groups of x's rows, group g times weight g ([k, n] int8, scales [nb, n] bf16).
struct Int8Job {
  int64_t k, n, nb;
  const int8_t* w;     // [groups, k, n]
  const uint16_t* s;   // [groups, nb, n]
  std::vector<int64_t> first, rows;  // per group: first row of x, row count
  const float* xf = nullptr;         // x as f32 [rows, k] (f32 panels)
  const uint32_t* xp = nullptr;      // x as bf16 pairs [rows, kp / 2] (bf16 panels), kp = k rounded up to even
  int64_t kp = 0;
  float* y;  // [rows, n]
};

// Weight row i's dequantized values for columns [c0, c0 + nc), rounded to bf16, into out[0..nc),
// zeros in out[nc..width).
inline void DequantRowScalar(const Int8Job& job, int64_t g, int64_t i, int64_t c0, int64_t nc, int64_t width,
                             float* out) {
  const int8_t* w = job.w + (g * job.k + i) * job.n + c0;
  const uint16_t* s = job.s + (g * job.nb + i / (job.k / job.nb)) * job.n + c0;
  for (int64_t c = 0; c < nc; ++c) out[c] = RoundToBf16(static_cast<float>(w[c]) * Bf16ToF32(s[c]));
  for (int64_t c = nc; c < width; ++c) out[c] = 0.0f;
}

// A unit of work: one group's rows times the columns [c0, c0 + kUnit) of its weight. Its rows are
// walked in chunks of kChunk; each chunk's weights are dequantized into a panel (sub-tiles of the
// code path's register width, kChunk rows of each) that stays in L1 while every row of x reads
// it. A unit spans 256 bytes of each weight row, so its reads are runs of 4 cache lines: columns
// of one cache line, walked down 2,048 or more rows, read at a third of the bandwidth.
constexpr int64_t kUnit = 256, kChunk = 32;

// The unit's f32 accumulators [rows, kUnit] for all rows of a group, and its result columns.
struct Unit {
  const Int8Job& job;
  int64_t g, c0, cols, m;
  std::vector<float> acc;
  Unit(const Int8Job& job, int64_t g, int64_t c0)
      : job(job), g(g), c0(c0), cols(std::min(kUnit, job.n - c0)), m(job.rows[g]), acc(m * kUnit, 0.0f) {}
  // Valid columns of sub-tile s of width `width`.
  int64_t Valid(int64_t s, int64_t width) const { return std::clamp<int64_t>(cols - s * width, 0, width); }
  int64_t Subtiles(int64_t width) const { return (cols + width - 1) / width; }
  // Asks for the unit's columns of weight rows [i0, i0 + count) to be brought into the caches: the
  // next chunk's, while this one is computed (the hardware prefetchers do not follow runs of a
  // few cache lines spaced a whole weight row apart).
  void Prefetch(int64_t i0, int64_t count) const {
    for (int64_t i = i0; i < std::min(job.k, i0 + count); ++i) {
      const int8_t* row = job.w + (g * job.k + i) * job.n + c0;
      for (int64_t c = 0; c < cols; c += 64) __builtin_prefetch(row + c);
    }
  }
  void Store() const {
    for (int64_t r = 0; r < m; ++r) std::copy_n(acc.data() + r * kUnit, cols, job.y + (job.first[g] + r) * job.n + c0);
  }
};

// ---- portable: sub-tiles of 16 columns ----

constexpr int64_t kPortableWidth = 16;

void Int8UnitPortable(const Int8Job& job, int64_t g, int64_t c0) {
  constexpr int64_t width = kPortableWidth;
  Unit unit(job, g, c0);
  std::vector<float> panel(kUnit * kChunk);  // [sub-tile][row][width]
  for (int64_t i0 = 0; i0 < job.k; i0 += kChunk) {
    const int64_t len = std::min(kChunk, job.k - i0);
    for (int64_t s = 0; s < unit.Subtiles(width); ++s) {
      float* sub = panel.data() + s * kChunk * width;
      for (int64_t i = 0; i < len; ++i) DequantRowScalar(job, g, i0 + i, c0 + s * width, unit.Valid(s, width), width, sub + i * width);
      for (int64_t r = 0; r < unit.m; ++r) {
        const float* x = job.xf + (job.first[g] + r) * job.k + i0;
        float* acc = unit.acc.data() + r * kUnit + s * width;
        for (int64_t i = 0; i < len; ++i)
          for (int64_t c = 0; c < width; ++c) acc[c] += x[i] * sub[i * width + c];
      }
    }
  }
  unit.Store();
}

// The FMA slab's column order: widening 32 bf16 values (columns 0-31 of a row, rounded by one
// vcvtne2ps2bf16) back to f32 by interleaving zero words works within 128-bit lanes, so one
// vector holds columns 0-3, 8-11, 16-19, 24-27 and the other 4-7, 12-15, 20-23, 28-31.
alignas(64) constexpr int32_t kScrambled[32] = {0, 1, 2,  3,  8,  9,  10, 11, 16, 17, 18, 19, 24, 25, 26, 27,
                                                4, 5, 6,  7,  12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};

// Where column j of 32 sits in the scrambled order (kScrambled's inverse).
constexpr std::array<int32_t, 32> kScrambledPosition = [] {
  std::array<int32_t, 32> position{};
  for (int32_t j = 0; j < 32; ++j) position[kScrambled[j]] = j;
  return position;
}();

#ifdef GROK_X86

// ---- AVX2 + FMA: sub-tiles of 32 columns (4 ymm), f32 panel ----

constexpr int64_t kAvx2Width = 32;

__attribute__((target("avx2,fma"))) inline __m256 RoundToBf16Avx2(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), odd);
  return _mm256_castsi256_ps(_mm256_and_si256(rounded, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

template <int R>
__attribute__((target("avx2,fma"))) void MultiplyAvx2(const float* panel, int64_t len, const float* x, int64_t x_stride,
                                                       float* acc) {
  __m256 a[R][4];
  #pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 32
    for (int c = 0; c < 4; ++c) a[r][c] = _mm256_loadu_ps(acc + r * kUnit + 8 * c);
  for (int64_t i = 0; i < len; ++i) {
    const float* p = panel + i * kAvx2Width;
    #pragma GCC unroll 32
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_broadcast_ss(x + r * x_stride + i);
      #pragma GCC unroll 32
      for (int c = 0; c < 4; ++c) a[r][c] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(p + 8 * c), a[r][c]);
    }
  }
  #pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 32
    for (int c = 0; c < 4; ++c) _mm256_storeu_ps(acc + r * kUnit + 8 * c, a[r][c]);
}

__attribute__((target("avx2,fma"))) void Int8UnitAvx2(const Int8Job& job, int64_t g, int64_t c0) {
  constexpr int64_t width = kAvx2Width;
  Unit unit(job, g, c0);
  alignas(64) float panel[kUnit * kChunk];  // [sub-tile][row][width]
  alignas(32) float scales[kUnit];  // the current row block's scales of the unit's columns
  const int64_t block = job.k / job.nb, subtiles = unit.Subtiles(width);
  int64_t block_end = 0;  // rows walk upwards: the scales change at block_end
  for (int64_t i0 = 0; i0 < job.k; i0 += kChunk) {
    const int64_t len = std::min(kChunk, job.k - i0);
    unit.Prefetch(i0 + kChunk, kChunk);
    for (int64_t i = 0; i < len; ++i) {
      const int8_t* w = job.w + (g * job.k + i0 + i) * job.n + c0;
      if (i0 + i >= block_end) {
        const uint16_t* row = job.s + (g * job.nb + block_end / block) * job.n + c0;
        block_end += block;
        for (int64_t c = 0; c < unit.cols; ++c) scales[c] = Bf16ToF32(row[c]);
      }
      for (int64_t s = 0; s < subtiles; ++s) {
        float* out = panel + (s * kChunk + i) * width;
        if (unit.Valid(s, width) < width) {
          DequantRowScalar(job, g, i0 + i, c0 + s * width, unit.Valid(s, width), width, out);
          continue;
        }
        #pragma GCC unroll 32
        for (int c = 0; c < 4; ++c) {
          const int64_t col = s * width + 8 * c;
          const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + col)));
          const __m256 value = _mm256_mul_ps(_mm256_cvtepi32_ps(q), _mm256_load_ps(scales + col));
          _mm256_storeu_ps(out + 8 * c, RoundToBf16Avx2(value));
        }
      }
    }
    for (int64_t s = 0; s < subtiles; ++s) {
      for (int64_t r = 0; r < unit.m; r += 3) {
        const float* x = job.xf + (job.first[g] + r) * job.k + i0;
        float* acc = unit.acc.data() + r * kUnit + s * width;
        const float* sub = panel + s * kChunk * width;
        switch (std::min<int64_t>(3, unit.m - r)) {
          case 3: MultiplyAvx2<3>(sub, len, x, job.k, acc); break;
          case 2: MultiplyAvx2<2>(sub, len, x, job.k, acc); break;
          default: MultiplyAvx2<1>(sub, len, x, job.k, acc); break;
        }
      }
    }
  }
  unit.Store();
}

// ---- AVX-512 (F, BW, VL, BF16): sub-tiles of 64 columns (4 zmm) ----

#define GROK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

constexpr int64_t kAvx512Width = 64;
constexpr int kAvx512Rows = 6;  // rows of x per register block: 24 accumulators

// Columns [col, col + 64) of weight rows as f32 (int8 times its scale, unrounded), the scales of
// the current row block held in registers. Rows are asked for in increasing order.
struct RowsAvx512 {
  const Int8Job* job = nullptr;
  int64_t g = 0, col = 0, block = 1, block_end = 0;  // rows up to block_end share `scale`
  __m512 scale[4];

  RowsAvx512() = default;
  RowsAvx512(const Int8Job& job, int64_t g, int64_t col) : job(&job), g(g), col(col), block(job.k / job.nb) {}

  GROK_AVX512 inline void Row(int64_t i, __m512 out[4]) {
    if (i >= block_end) {  // a division only when the block changes, not per row
      const int64_t b = i / block;
      block_end = (b + 1) * block;
      const uint16_t* s = job->s + (g * job->nb + b) * job->n + col;
      #pragma GCC unroll 32
      for (int c = 0; c < 4; ++c) {
        const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 16 * c)));
        scale[c] = _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
      }
    }
    const int8_t* w = job->w + (g * job->k + i) * job->n + col;
    #pragma GCC unroll 32
    for (int c = 0; c < 4; ++c) {
      const __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16 * c)));
      out[c] = _mm512_mul_ps(_mm512_cvtepi32_ps(q), scale[c]);
    }
  }
};

// R rows of 64 f32 accumulators (rows at `stride`) to registers and back.
template <int R>
GROK_AVX512 inline __attribute__((always_inline)) void LoadRows(const float* from, int64_t stride, __m512 (&a)[R][4]) {
  #pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 32
    for (int c = 0; c < 4; ++c) a[r][c] = _mm512_loadu_ps(from + r * stride + 16 * c);
}

template <int R>
GROK_AVX512 inline __attribute__((always_inline)) void StoreRows(const __m512 (&a)[R][4], float* to, int64_t stride) {
  #pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 32
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(to + r * stride + 16 * c, a[r][c]);
}

template <int R>
GROK_AVX512 void MultiplyPairs(const uint32_t* panel, int64_t pairs, const uint32_t* x, int64_t x_stride, float* acc) {
  __m512 a[R][4];
  LoadRows<R>(acc, kUnit, a);
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh w[4];
    #pragma GCC unroll 32
    for (int c = 0; c < 4; ++c) w[c] = (__m512bh)_mm512_loadu_si512(panel + p * kAvx512Width + 16 * c);
    #pragma GCC unroll 32
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[r * x_stride + p]));
      #pragma GCC unroll 32
      for (int c = 0; c < 4; ++c) a[r][c] = _mm512_dpbf16_ps(a[r][c], w[c], xv);
    }
  }
  StoreRows<R>(a, acc, kUnit);
}

// Rows i and i + 1 of 64 columns as bf16 pairs (the two rows of a column in one 32-bit lane).
GROK_AVX512 inline void PairsAvx512(RowsAvx512& source, int64_t i, const __m512i& interleave, __m512i out[4]) {
  __m512 even[4], odd[4];
  source.Row(i, even);
  source.Row(i + 1, odd);
  #pragma GCC unroll 32
  for (int c = 0; c < 4; ++c) {
    const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(odd[c], even[c]);  // words: even 0..15, odd 0..15
    out[c] = _mm512_permutexvar_epi16(interleave, both);
  }
}

alignas(64) constexpr uint16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                  8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};

constexpr int64_t kSlabAhead = 24;  // weight rows prefetched ahead

template <int R>
GROK_AVX512 void Int8SlabAvx512(const Int8Job& job, int64_t g, int64_t i0, int64_t i1, float* partial, int64_t n_pad) {
  constexpr int64_t width = kAvx512Width, rows_per_step = 16;
  const __m512i interleave = _mm512_load_si512(kInterleave);
  const int64_t x_stride = job.kp / 2;
  const uint32_t* x = job.xp + job.first[g] * x_stride;
  float lanes[2][kAvx512Width];
  for (int64_t ic = i0; ic < i1; ic += rows_per_step) {
    const int64_t ie = std::min(i1, ic + rows_per_step);
    for (int64_t col = 0; col < job.n; col += width) {
      const int64_t valid = std::min(width, job.n - col);
      __m512 a[R][4];
      LoadRows<R>(partial + col, n_pad, a);
      RowsAvx512 source(job, g, col);
      for (int64_t i = ic; i < ie; i += 2) {
        const int8_t* ahead = job.w + (g * job.k + i + kSlabAhead) * job.n + col;
        if (i + kSlabAhead + 1 < job.k) _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T0);
        if (i + kSlabAhead + 1 < job.k) _mm_prefetch(reinterpret_cast<const char*>(ahead + job.n), _MM_HINT_T0);
        __m512i w[4];
        if (valid == width && i + 1 < job.k) {
          PairsAvx512(source, i, interleave, w);
        } else {  // a partial tile, or the odd last row: scalar
          DequantRowScalar(job, g, i, col, valid, width, lanes[0]);
          if (i + 1 < job.k) DequantRowScalar(job, g, i + 1, col, valid, width, lanes[1]);
          else std::fill_n(lanes[1], width, 0.0f);
          alignas(64) uint32_t packed[kAvx512Width];
          for (int64_t c = 0; c < width; ++c) packed[c] = F32ToBf16(lanes[0][c]) | (uint32_t{F32ToBf16(lanes[1][c])} << 16);
          #pragma GCC unroll 32
          for (int c = 0; c < 4; ++c) w[c] = _mm512_load_si512(packed + 16 * c);
        }
        #pragma GCC unroll 32
        for (int r = 0; r < R; ++r) {
          const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[r * x_stride + i / 2]));
          #pragma GCC unroll 32
          for (int c = 0; c < 4; ++c) a[r][c] = _mm512_dpbf16_ps(a[r][c], (__m512bh)w[c], xv);
        }
      }
      StoreRows<R>(a, partial + col, n_pad);
    }
  }
}

// Rows [rows, n_pad] of sums in the scrambled order, put back in natural column order.
void Unscramble(float* sums, int64_t rows, int64_t n_pad) {
  float block[32];
  for (int64_t start = 0; start < rows * n_pad; start += 32) {
    for (int j = 0; j < 32; ++j) block[kScrambled[j]] = sums[start + j];
    std::copy_n(block, 32, sums + start);
  }
}

// A partial tile's weight row (columns [col, col + valid), zeros after) in the scrambled order.
void DequantRowScrambled(const Int8Job& job, int64_t g, int64_t i, int64_t col, int64_t valid, float* out) {
  float natural[kAvx512Width];
  DequantRowScalar(job, g, i, col, valid, kAvx512Width, natural);
  for (int64_t j = 0; j < kAvx512Width; ++j) out[j] = natural[32 * (j / 32) + kScrambled[j % 32]];
}

// Weight row i's 64 columns rounded to bf16 and widened back to f32, in the scrambled order.
GROK_AVX512 inline void ScrambledRowAvx512(RowsAvx512& source, int64_t i, __m512 out[4]) {
  __m512 v[4];
  source.Row(i, v);
  #pragma GCC unroll 32
  for (int h = 0; h < 2; ++h) {
    const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(v[2 * h + 1], v[2 * h]);
    out[2 * h] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(_mm512_setzero_si512(), both));
    out[2 * h + 1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(_mm512_setzero_si512(), both));
  }
}

// Rows of f32 x times weight rows [i0, i1) of group g, every column, with f32 FMAs: each weight
// row is dequantized, rounded to bf16 and widened back in registers (the scrambled order above),
// 16 rows per step across the width; partial[r] holds row r's sums in natural column order.
template <int R>
GROK_AVX512 void Int8SlabAvx512Fma(const Int8Job& job, int64_t g, int64_t i0, int64_t i1, float* partial, int64_t n_pad) {
  constexpr int64_t width = kAvx512Width, rows_per_step = 16;
  const float* x = job.xf + job.first[g] * job.k;
  alignas(64) float scrambled[kAvx512Width];
  for (int64_t ic = i0; ic < i1; ic += rows_per_step) {
    const int64_t ie = std::min(i1, ic + rows_per_step);
    for (int64_t col = 0; col < job.n; col += width) {
      const int64_t valid = std::min(width, job.n - col);
      __m512 a[R][4];
      LoadRows<R>(partial + col, n_pad, a);
      RowsAvx512 source(job, g, col);
      for (int64_t i = ic; i < ie; ++i) {
        const int8_t* ahead = job.w + (g * job.k + i + kSlabAhead) * job.n + col;
        if (i + kSlabAhead < job.k) _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T0);
        __m512 w[4];
        if (valid == width) {
          ScrambledRowAvx512(source, i, w);
        } else {  // a partial tile: scalar
          DequantRowScrambled(job, g, i, col, valid, scrambled);
          #pragma GCC unroll 32
          for (int c = 0; c < 4; ++c) w[c] = _mm512_load_ps(scrambled + 16 * c);
        }
        #pragma GCC unroll 32
        for (int r = 0; r < R; ++r) {
          const __m512 xv = _mm512_set1_ps(x[r * job.k + i]);
          #pragma GCC unroll 32
          for (int c = 0; c < 4; ++c) a[r][c] = _mm512_fmadd_ps(xv, w[c], a[r][c]);
        }
      }
      StoreRows<R>(a, partial + col, n_pad);
    }
  }
  Unscramble(partial, R, n_pad);
}

// bf16 x: a panel of bf16 pairs (rows i, i + 1 of a column in one 32-bit lane) for vdpbf16ps.
GROK_AVX512 void Int8UnitAvx512Bf16(const Int8Job& job, int64_t g, int64_t c0) {
  constexpr int64_t width = kAvx512Width, chunk = kChunk / 2;  // pairs per chunk: the same 32 KiB panel
  Unit unit(job, g, c0);
  const int64_t x_stride = job.kp / 2, subtiles = unit.Subtiles(width);
  alignas(64) uint32_t panel[kUnit * chunk * 2];  // [sub-tile][pair][width]
  const __m512i interleave = _mm512_load_si512(kInterleave);
  float rows[2][kAvx512Width];
  for (int64_t p0 = 0; p0 < x_stride; p0 += 2 * chunk) {
    const int64_t pairs = std::min(2 * chunk, x_stride - p0);
    unit.Prefetch(2 * (p0 + 2 * chunk), 4 * chunk);
    for (int64_t s = 0; s < subtiles; ++s) {
      const int64_t valid = unit.Valid(s, width);
      RowsAvx512 source(job, g, c0 + s * width);
      for (int64_t p = 0; p < pairs; ++p) {
        const int64_t i = 2 * (p0 + p);
        uint32_t* out = panel + (s * 2 * chunk + p) * width;
        if (valid < width || i + 1 >= job.k) {  // a partial sub-tile, or the odd last row: scalar
          DequantRowScalar(job, g, i, c0 + s * width, valid, width, rows[0]);
          if (i + 1 < job.k) DequantRowScalar(job, g, i + 1, c0 + s * width, valid, width, rows[1]);
          else std::fill_n(rows[1], width, 0.0f);
          for (int64_t c = 0; c < width; ++c) out[c] = F32ToBf16(rows[0][c]) | (uint32_t{F32ToBf16(rows[1][c])} << 16);
          continue;
        }
        __m512i lanes[4];
        PairsAvx512(source, i, interleave, lanes);
        #pragma GCC unroll 32
        for (int c = 0; c < 4; ++c) _mm512_store_si512(out + 16 * c, lanes[c]);
      }
    }
    for (int64_t s = 0; s < subtiles; ++s) {
      const uint32_t* sub = panel + s * 2 * chunk * width;
      for (int64_t r = 0; r < unit.m; r += kAvx512Rows) {
        const uint32_t* x = job.xp + (job.first[g] + r) * x_stride + p0;
        float* acc = unit.acc.data() + r * kUnit + s * width;
        switch (std::min<int64_t>(kAvx512Rows, unit.m - r)) {
          case 6: MultiplyPairs<6>(sub, pairs, x, x_stride, acc); break;
          case 5: MultiplyPairs<5>(sub, pairs, x, x_stride, acc); break;
          case 4: MultiplyPairs<4>(sub, pairs, x, x_stride, acc); break;
          case 3: MultiplyPairs<3>(sub, pairs, x, x_stride, acc); break;
          case 2: MultiplyPairs<2>(sub, pairs, x, x_stride, acc); break;
          default: MultiplyPairs<1>(sub, pairs, x, x_stride, acc); break;
        }
      }
    }
  }
  unit.Store();
}

template <int R>
GROK_AVX512 void MultiplyF32(const float* panel, int64_t len, const float* x, int64_t x_stride, float* acc,
                             int64_t acc_stride) {
  __m512 a[R][4];
  LoadRows<R>(acc, acc_stride, a);
  for (int64_t i = 0; i < len; ++i) {
    __m512 w[4];
    #pragma GCC unroll 32
    for (int c = 0; c < 4; ++c) w[c] = _mm512_loadu_ps(panel + i * kAvx512Width + 16 * c);
    #pragma GCC unroll 32
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * x_stride + i]);
      #pragma GCC unroll 32
      for (int c = 0; c < 4; ++c) a[r][c] = _mm512_fmadd_ps(xv, w[c], a[r][c]);
    }
  }
  StoreRows<R>(a, acc, acc_stride);
}

// acc[r] += x[r] . panel for `rows` rows of x, six at a time (24 accumulators).
GROK_AVX512 void MultiplyF32Rows(const float* panel, int64_t len, const float* x, int64_t x_stride, int64_t rows,
                                 float* acc, int64_t acc_stride) {
  for (int64_t r = 0; r < rows; r += kAvx512Rows) {
    const float* xr = x + r * x_stride;
    float* ar = acc + r * acc_stride;
    switch (std::min<int64_t>(kAvx512Rows, rows - r)) {
      case 6: MultiplyF32<6>(panel, len, xr, x_stride, ar, acc_stride); break;
      case 5: MultiplyF32<5>(panel, len, xr, x_stride, ar, acc_stride); break;
      case 4: MultiplyF32<4>(panel, len, xr, x_stride, ar, acc_stride); break;
      case 3: MultiplyF32<3>(panel, len, xr, x_stride, ar, acc_stride); break;
      case 2: MultiplyF32<2>(panel, len, xr, x_stride, ar, acc_stride); break;
      default: MultiplyF32<1>(panel, len, xr, x_stride, ar, acc_stride); break;
    }
  }
}

// Int8SlabAvx512Fma for more rows than registers hold: each 16 x 64 tile of weights is
// dequantized into an L1 panel (scrambled order), then every row of x multiplies it.
GROK_AVX512 void Int8SlabAvx512FmaPanel(const Int8Job& job, int64_t g, int64_t i0, int64_t i1, float* partial,
                                        int64_t n_pad) {
  constexpr int64_t width = kAvx512Width, rows_per_step = 16;
  const float* x = job.xf + job.first[g] * job.k;
  alignas(64) float panel[rows_per_step * kAvx512Width];
  for (int64_t ic = i0; ic < i1; ic += rows_per_step) {
    const int64_t ie = std::min(i1, ic + rows_per_step);
    for (int64_t col = 0; col < job.n; col += width) {
      const int64_t valid = std::min(width, job.n - col);
      RowsAvx512 source(job, g, col);
      for (int64_t i = ic; i < ie; ++i) {
        const int8_t* ahead = job.w + (g * job.k + i + kSlabAhead) * job.n + col;
        if (i + kSlabAhead < job.k) _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T0);
        float* out = panel + (i - ic) * width;
        if (valid < width) {
          DequantRowScrambled(job, g, i, col, valid, out);
          continue;
        }
        __m512 w[4];
        ScrambledRowAvx512(source, i, w);
        #pragma GCC unroll 32
        for (int c = 0; c < 4; ++c) _mm512_store_ps(out + 16 * c, w[c]);
      }
      MultiplyF32Rows(panel, ie - ic, x + ic, job.k, job.rows[g], partial + col, n_pad);
    }
  }
  Unscramble(partial, job.rows[g], n_pad);
}

// f32 x (the experts' last product): an f32 panel of the bf16 values, and FMAs.
GROK_AVX512 void Int8UnitAvx512F32(const Int8Job& job, int64_t g, int64_t c0) {
  constexpr int64_t width = kAvx512Width;
  Unit unit(job, g, c0);
  const int64_t subtiles = unit.Subtiles(width);
  alignas(64) float panel[kUnit * kChunk];  // [sub-tile][row][width]
  for (int64_t i0 = 0; i0 < job.k; i0 += kChunk) {
    const int64_t len = std::min(kChunk, job.k - i0);
    unit.Prefetch(i0 + kChunk, kChunk);
    for (int64_t s = 0; s < subtiles; ++s) {
      RowsAvx512 source(job, g, c0 + s * width);
      for (int64_t i = 0; i < len; ++i) {
        float* out = panel + (s * kChunk + i) * width;
        if (unit.Valid(s, width) < width) {
          DequantRowScalar(job, g, i0 + i, c0 + s * width, unit.Valid(s, width), width, out);
          continue;
        }
        __m512 v[4];
        source.Row(i0 + i, v);
        #pragma GCC unroll 32
        for (int c = 0; c < 4; ++c) {
          const __m512i h = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v[c]));
          _mm512_store_ps(out + 16 * c, _mm512_castsi512_ps(_mm512_slli_epi32(h, 16)));
        }
      }
    }
    for (int64_t s = 0; s < subtiles; ++s) {
      const float* x = job.xf + job.first[g] * job.k + i0;
      MultiplyF32Rows(panel + s * kChunk * width, len, x, job.k, unit.m, unit.acc.data() + s * width, kUnit);
    }
  }
  unit.Store();
}

#endif  // GROK_X86

bool IsaBuilt(int32_t isa) {
#ifdef GROK_X86
  return isa == kPortable || isa == kAvx2 || isa == kAvx512 || isa == kAvx512Fma;
#else
  return isa == kPortable;
#endif
}

// y [r, n] (f32) = each group of x's rows [r, k] times its weight: weight [groups, k, n] int8 with
// scales [groups, nb, n] bf16; group_sizes [groups] rows in order; rows past the groups are zero.
// A weight whose group is empty is not read.
ffi::Error Int8Matmul(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> group_sizes,
                      ffi::Buffer<ffi::S8> weight, ffi::Buffer<ffi::BF16> scales, ffi::ResultBuffer<ffi::F32> y,
                      int32_t isa, int64_t threads) {
  const auto xd = x.dimensions(), wd = weight.dimensions(), sd = scales.dimensions();
  const bool x_bf16 = x.element_type() == ffi::DataType::BF16;
  if (!x_bf16 && x.element_type() != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument("grok_int8_matmul: x must be bf16 or f32");
  }
  if (xd.size() != 2 || wd.size() != 3 || sd.size() != 3 || group_sizes.dimensions().size() != 1 ||
      wd[0] != group_sizes.dimensions()[0] || sd[0] != wd[0] || xd[1] != wd[1] || sd[2] != wd[2] || sd[1] < 1 ||
      wd[1] % sd[1] != 0) {
    return ffi::Error::InvalidArgument(
        "grok_int8_matmul expects x [r, k], group_sizes [g], weight [g, k, n] and scales [g, nb, n] with nb | k");
  }
  if (!IsaBuilt(isa)) return ffi::Error::InvalidArgument("grok_int8_matmul: this build lacks the requested isa");
  Int8Job job;
  job.k = wd[1];
  job.n = wd[2];
  job.nb = sd[1];
  job.w = weight.typed_data();
  job.s = scales.typed_data();
  job.y = y->typed_data();
  const int64_t rows = xd[0];
  int64_t total = 0;
  for (int64_t g = 0; g < wd[0]; ++g) {
    const int32_t size = group_sizes.typed_data()[g];
    if (size < 0 || total + size > rows) {
      return ffi::Error::InvalidArgument("grok_int8_matmul: the groups exceed x's rows");
    }
    job.first.push_back(total);
    job.rows.push_back(size);
    total += size;
  }
  std::fill(job.y + total * job.n, job.y + rows * job.n, 0.0f);
  if (total == 0 || job.n == 0) return ffi::Error::Success();
  if (job.k == 0) {
    std::fill_n(job.y, total * job.n, 0.0f);
    return ffi::Error::Success();
  }
  // x in the form the panels read: bf16 pairs (AVX-512 with bf16 x, and with a few rows of f32 x
  // split into three bf16 rows each), else f32 (every other path, AVX-512 with FMAs included).
  std::vector<float> xf, y3;
  std::vector<uint16_t> xb;
  const bool split = isa == kAvx512 && !x_bf16 && total <= kSplitRows;
  const bool pairs = isa == kAvx512 && (x_bf16 || split);
  if (split) {
    job.kp = job.k + job.k % 2;
    const float* src = static_cast<const float*>(x.untyped_data());
    xb.assign(3 * total * job.kp, 0);
    for (int64_t r = 0; r < total; ++r) {
      for (int64_t i = 0; i < job.k; ++i) {  // x = hi + mid + lo exactly: each rest has fewer bits
        const uint16_t hi = F32ToBf16(src[r * job.k + i]);
        const float rest = src[r * job.k + i] - Bf16ToF32(hi);
        const uint16_t mid = F32ToBf16(rest);
        xb[(3 * r) * job.kp + i] = hi;
        xb[(3 * r + 1) * job.kp + i] = mid;
        xb[(3 * r + 2) * job.kp + i] = F32ToBf16(rest - Bf16ToF32(mid));
      }
    }
    job.xp = reinterpret_cast<const uint32_t*>(xb.data());
    for (auto& v : job.first) v *= 3;
    for (auto& v : job.rows) v *= 3;
    y3.resize(3 * total * job.n);
    job.y = y3.data();
  } else if (pairs) {
    job.kp = job.k + job.k % 2;
    const uint16_t* src = static_cast<const uint16_t*>(x.untyped_data());
    if (job.kp == job.k) {
      job.xp = reinterpret_cast<const uint32_t*>(src);
    } else {
      xb.assign(total * job.kp, 0);
      for (int64_t r = 0; r < total; ++r) std::copy_n(src + r * job.k, job.k, xb.data() + r * job.kp);
      job.xp = reinterpret_cast<const uint32_t*>(xb.data());
    }
  } else if (x_bf16) {
    const uint16_t* src = static_cast<const uint16_t*>(x.untyped_data());
    xf.resize(total * job.k);
    for (int64_t i = 0; i < total * job.k; ++i) xf[i] = Bf16ToF32(src[i]);
    job.xf = xf.data();
  } else {
    job.xf = static_cast<const float*>(x.untyped_data());
  }
  // Units of work: a group of a few rows (decoding, bf16 pairs) in slabs of weight rows, whose
  // partial sums are added afterwards, in slab order; any other group in column tiles.
  struct Work {
    int64_t g, start;  // a slab's first weight row, or a column tile's first column
    bool slab;
  };
  const int64_t tiles = (job.n + kUnit - 1) / kUnit, n_pad = (job.n + 63) / 64 * 64;
  const int64_t slabs = std::clamp<int64_t>(job.k / 256, 1, 8), slab_rows = ((job.k + slabs - 1) / slabs + 15) / 16 * 16;
  std::vector<Work> work;
  std::vector<int64_t> slab_groups;
  for (int64_t g = 0; g < static_cast<int64_t>(job.rows.size()); ++g) {
    if (job.rows[g] == 0) continue;
    if ((pairs && job.rows[g] <= kSlabRows) || (isa == kAvx512Fma && job.rows[g] <= kFmaSlabRows)) {
      slab_groups.push_back(g);
      for (int64_t i = 0; i < job.k; i += slab_rows) work.push_back({g, i, true});
    } else {
      for (int64_t t = 0; t < tiles; ++t) work.push_back({g, t * kUnit, false});
    }
  }
  // Partial sums of the slabs: [work item][rows of its group][n_pad].
  std::vector<int64_t> offset(work.size(), 0);
  int64_t partial_size = 0;
  for (size_t u = 0; u < work.size(); ++u)
    if (work[u].slab) offset[u] = partial_size, partial_size += job.rows[work[u].g] * n_pad;
  std::vector<float> partial(partial_size, 0.0f);
  ParallelFor(pool, threads, static_cast<int64_t>(work.size()), [&](int64_t u) {
    const Work& item = work[u];
#ifdef GROK_X86
    if (item.slab) {
      const int64_t end = std::min(job.k, item.start + slab_rows);
      float* out = partial.data() + offset[u];
      if (isa == kAvx512Fma) {
        switch (job.rows[item.g]) {
          case 6: return Int8SlabAvx512Fma<6>(job, item.g, item.start, end, out, n_pad);
          case 5: return Int8SlabAvx512Fma<5>(job, item.g, item.start, end, out, n_pad);
          case 4: return Int8SlabAvx512Fma<4>(job, item.g, item.start, end, out, n_pad);
          case 3: return Int8SlabAvx512Fma<3>(job, item.g, item.start, end, out, n_pad);
          case 2: return Int8SlabAvx512Fma<2>(job, item.g, item.start, end, out, n_pad);
          case 1: return Int8SlabAvx512Fma<1>(job, item.g, item.start, end, out, n_pad);
          default: return Int8SlabAvx512FmaPanel(job, item.g, item.start, end, out, n_pad);
        }
      }
      switch (job.rows[item.g]) {
        case 3: return Int8SlabAvx512<3>(job, item.g, item.start, end, out, n_pad);
        case 2: return Int8SlabAvx512<2>(job, item.g, item.start, end, out, n_pad);
        default: return Int8SlabAvx512<1>(job, item.g, item.start, end, out, n_pad);
      }
    }
    if (pairs) return Int8UnitAvx512Bf16(job, item.g, item.start);
    if (isa == kAvx512 || isa == kAvx512Fma) return Int8UnitAvx512F32(job, item.g, item.start);
    if (isa == kAvx2) return Int8UnitAvx2(job, item.g, item.start);
#endif
    Int8UnitPortable(job, item.g, item.start);
  });
  for (int64_t g : slab_groups) {  // the slabs' sums, in order
    for (int64_t r = 0; r < job.rows[g]; ++r) {
      float* out = job.y + (job.first[g] + r) * job.n;
      std::fill_n(out, job.n, 0.0f);
      for (size_t u = 0; u < work.size(); ++u) {
        if (!work[u].slab || work[u].g != g) continue;
        const float* part = partial.data() + offset[u] + r * n_pad;
        for (int64_t j = 0; j < job.n; ++j) out[j] += part[j];
      }
    }
  }
  if (split) {  // each row's three parts, added
    float* out = y->typed_data();
    for (int64_t r = 0; r < total; ++r)
      for (int64_t j = 0; j < job.n; ++j)
        out[r * job.n + j] = (y3[(3 * r) * job.n + j] + y3[(3 * r + 1) * job.n + j]) + y3[(3 * r + 2) * job.n + j];
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// The bf16 product with a transposed table: y [m, n] = x [m, k] . table [n, k]^T, both bf16.
// ---------------------------------------------------------------------------------------------

constexpr int64_t kTableRowsPerTask = 96;

void TableRowsPortable(const float* x, int64_t m, int64_t k, const uint16_t* table, int64_t j0, int64_t j1, int64_t n,
                       float* y) {
  std::vector<float> row(k);
  for (int64_t j = j0; j < j1; ++j) {
    for (int64_t t = 0; t < k; ++t) row[t] = Bf16ToF32(table[j * k + t]);
    for (int64_t r = 0; r < m; ++r) {
      float sum = 0.0f;
      for (int64_t t = 0; t < k; ++t) sum += x[r * k + t] * row[t];
      y[r * n + j] = sum;
    }
  }
}

#ifdef GROK_X86

__attribute__((target("avx2,fma"))) inline float HorizontalSum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Three table rows at a time, each converted to f32 in registers; x (f32) in rows of up to 4.
__attribute__((target("avx2,fma"))) void TableRowsAvx2(const float* x, int64_t m, int64_t k, const uint16_t* table,
                                                       int64_t j0, int64_t j1, int64_t n, float* y) {
  const int64_t k8 = k - k % 8;
  for (int64_t j = j0; j < j1; j += 3) {
    const int c = static_cast<int>(std::min<int64_t>(3, j1 - j));
    for (int64_t r0 = 0; r0 < m; r0 += 4) {
      const int rr = static_cast<int>(std::min<int64_t>(4, m - r0));
      __m256 a[4][3];
      #pragma GCC unroll 32
      for (int r = 0; r < 4; ++r)
        #pragma GCC unroll 32
        for (int i = 0; i < 3; ++i) a[r][i] = _mm256_setzero_ps();
      for (int64_t t = 0; t < k8; t += 8) {
        __m256 w[3];
        #pragma GCC unroll 32
        for (int i = 0; i < c; ++i) {
          const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(table + (j + i) * k + t));
          w[i] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        }
        #pragma GCC unroll 32
        for (int r = 0; r < rr; ++r) {
          const __m256 xv = _mm256_loadu_ps(x + (r0 + r) * k + t);
          #pragma GCC unroll 32
          for (int i = 0; i < c; ++i) a[r][i] = _mm256_fmadd_ps(xv, w[i], a[r][i]);
        }
      }
      #pragma GCC unroll 32
      for (int r = 0; r < rr; ++r) {
        #pragma GCC unroll 32
        for (int i = 0; i < c; ++i) {
          float sum = HorizontalSum8(a[r][i]);
          for (int64_t t = k8; t < k; ++t) sum += x[(r0 + r) * k + t] * Bf16ToF32(table[(j + i) * k + t]);
          y[(r0 + r) * n + j + i] = sum;
        }
      }
    }
  }
}

// Register blocks of TableRows: acc[r][c] (16 partial sums) += x row r . table row c over
// [start, end) of `in`, x's rows at stride x_stride and the table's at k.
//
// Bf16Pairs: bf16 x, 32 values per vdpbf16ps, kC table rows at a time. (The hardware prefetchers
// follow these C streams: software prefetching measured 5% slower.)
struct Bf16Pairs {
  using X = uint16_t;
  static constexpr int kC = 6;
  template <int R, int C>
  GROK_AVX512 static void Block(const X* x, int64_t x_stride, const uint16_t* table, int64_t k, int64_t start,
                                int64_t end, float* acc);
};

// F32Fma (kAvx512Fma): 32 bf16 of the table widened by interleaving zero words, which scrambles
// `in` within each 32 (kScrambled), then FMAs; x comes as f32 in that order, zero-padded to a
// multiple of 32.
struct F32Fma {
  using X = float;
  static constexpr int kC = 5;
  template <int R, int C>
  GROK_AVX512 static void Block(const X* x, int64_t x_stride, const uint16_t* table, int64_t k, int64_t start,
                                int64_t end, float* acc);
};

template <int R, int C>
GROK_AVX512 void Bf16Pairs::Block(const uint16_t* x, int64_t x_stride, const uint16_t* table, int64_t k,
                                  int64_t start, int64_t end, float* acc) {
  __m512 a[R][C];
  #pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 32
    for (int c = 0; c < C; ++c) a[r][c] = _mm512_loadu_ps(acc + (r * C + c) * 16);
  for (int64_t t = start; t < end; t += 32) {
    const __mmask32 mask = end - t >= 32 ? ~__mmask32{0} : (__mmask32{1} << (end - t)) - 1;
    __m512bh w[C];
    #pragma GCC unroll 32
    for (int c = 0; c < C; ++c) w[c] = (__m512bh)_mm512_maskz_loadu_epi16(mask, table + c * k + t);
    #pragma GCC unroll 32
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + r * x_stride + t);
      #pragma GCC unroll 32
      for (int c = 0; c < C; ++c) a[r][c] = _mm512_dpbf16_ps(a[r][c], w[c], xv);
    }
  }
  #pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 32
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc + (r * C + c) * 16, a[r][c]);
}

// One row of x against table rows [j0, j1): each table row read start to end (one stream), four
// accumulators in flight.
GROK_AVX512 void TableRowsAvx512One(const uint16_t* x, int64_t k, const uint16_t* table, int64_t j0, int64_t j1, float* y) {
  for (int64_t j = j0; j < j1; ++j) {
    const uint16_t* row = table + j * k;
    __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int64_t t = 0;
    // Prefetch the row two ahead alongside: the hardware prefetchers stop at the end of each 4 KiB
    // page (a whole row at width 2,048). On a Xeon: 24-29 ms -> 20-23 ms for 131,072 rows.
    const char* ahead = reinterpret_cast<const char*>(table + (j + 2) * k);
    for (; t + 128 <= k; t += 128) {
      #pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) _mm_prefetch(ahead + 2 * t + 64 * u, _MM_HINT_T0);
      #pragma GCC unroll 4
      for (int u = 0; u < 4; ++u)
        a[u] = _mm512_dpbf16_ps(a[u], (__m512bh)_mm512_loadu_si512(row + t + 32 * u), (__m512bh)_mm512_loadu_si512(x + t + 32 * u));
    }
    for (; t < k; t += 32) {
      const __mmask32 mask = k - t >= 32 ? ~__mmask32{0} : (__mmask32{1} << (k - t)) - 1;
      a[0] = _mm512_dpbf16_ps(a[0], (__m512bh)_mm512_maskz_loadu_epi16(mask, row + t), (__m512bh)_mm512_maskz_loadu_epi16(mask, x + t));
    }
    y[j] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])));
  }
}

// Table rows [j0, j1) against every row of x (rows at stride x_stride): Blocks::kC table rows at
// a time, x in rows of up to 4, `in` walked in blocks so that later groups of x rows find the
// table rows' block in L1.
template <class Blocks>
GROK_AVX512 void TableRows(const typename Blocks::X* x, int64_t x_stride, int64_t m, int64_t k, const uint16_t* table,
                           int64_t j0, int64_t j1, int64_t n, float* y) {
  constexpr int64_t kBlock = 1024;
  constexpr int C = Blocks::kC;
  std::vector<float> acc(m * C * 16);
  for (int64_t j = j0; j < j1; j += C) {
    const int c = static_cast<int>(std::min<int64_t>(C, j1 - j));
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t start = 0; start < k; start += kBlock) {
      const int64_t end = std::min(k, start + kBlock);
      for (int64_t r0 = 0; r0 < m; r0 += 4) {
        const typename Blocks::X* xr = x + r0 * x_stride;
        float* ar = acc.data() + r0 * C * 16;
        const int rows = static_cast<int>(std::min<int64_t>(4, m - r0));
        const uint16_t* rows_j = table + j * k;
        if (c == C) {
          switch (rows) {
            case 4: Blocks::template Block<4, C>(xr, x_stride, rows_j, k, start, end, ar); break;
            case 3: Blocks::template Block<3, C>(xr, x_stride, rows_j, k, start, end, ar); break;
            case 2: Blocks::template Block<2, C>(xr, x_stride, rows_j, k, start, end, ar); break;
            default: Blocks::template Block<1, C>(xr, x_stride, rows_j, k, start, end, ar); break;
          }
        } else {  // the last few table rows, one at a time (accumulators at stride C as above)
          for (int i = 0; i < c; ++i)
            for (int r = 0; r < rows; ++r)
              Blocks::template Block<1, 1>(xr + r * x_stride, x_stride, rows_j + i * k, k, start, end,
                                           ar + (r * C + i) * 16);
        }
      }
    }
    for (int64_t r = 0; r < m; ++r)
      for (int i = 0; i < c; ++i) y[r * n + j + i] = _mm512_reduce_add_ps(_mm512_loadu_ps(acc.data() + (r * C + i) * 16));
  }
}

template <int R, int C>
GROK_AVX512 void F32Fma::Block(const float* xs, int64_t kp, const uint16_t* table, int64_t k, int64_t start,
                               int64_t end, float* acc) {
  const __m512i zero = _mm512_setzero_si512();
  __m512 a[R][C];
  #pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 32
    for (int c = 0; c < C; ++c) a[r][c] = _mm512_loadu_ps(acc + (r * C + c) * 16);
  for (int64_t t = start; t < end; t += 32) {
    const __mmask32 mask = k - t >= 32 ? ~__mmask32{0} : (__mmask32{1} << (k - t)) - 1;
    __m512 lo[R], hi[R];
    #pragma GCC unroll 32
    for (int r = 0; r < R; ++r) lo[r] = _mm512_loadu_ps(xs + r * kp + t), hi[r] = _mm512_loadu_ps(xs + r * kp + t + 16);
    #pragma GCC unroll 32
    for (int c = 0; c < C; ++c) {
      const __m512i w = _mm512_maskz_loadu_epi16(mask, table + c * k + t);
      const __m512 wl = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, w));
      const __m512 wh = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, w));
      #pragma GCC unroll 32
      for (int r = 0; r < R; ++r) a[r][c] = _mm512_fmadd_ps(wh, hi[r], _mm512_fmadd_ps(wl, lo[r], a[r][c]));
    }
  }
  #pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 32
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc + (r * C + c) * 16, a[r][c]);
}

// Independent chains of vdpbf16ps, or of FMAs, on registers; returns the seconds taken.
template <bool kBf16>
GROK_AVX512 double TimeChains(int64_t steps) {
  constexpr int kChains = 12;
  __m512 a[kChains];
  #pragma GCC unroll 32
  for (int c = 0; c < kChains; ++c) a[c] = _mm512_set1_ps(static_cast<float>(c));
  const __m512 w = _mm512_set1_ps(1.0f), x = _mm512_set1_ps(1e-9f);
  const auto start = std::chrono::steady_clock::now();
  for (int64_t t = 0; t < steps; ++t) {
    #pragma GCC unroll 32
    for (int c = 0; c < kChains; ++c)
      a[c] = kBf16 ? _mm512_dpbf16_ps(a[c], (__m512bh)w, (__m512bh)x) : _mm512_fmadd_ps(w, x, a[c]);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  __m512 sum = a[0];
  #pragma GCC unroll 32
  for (int c = 1; c < kChains; ++c) sum = _mm512_add_ps(sum, a[c]);
  volatile float sink = _mm512_reduce_add_ps(sum);  // every chain is live
  (void)sink;
  return seconds;
}

#endif  // GROK_X86

ffi::Error Bf16MatmulT(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> table,
                       ffi::ResultBuffer<ffi::F32> y, int32_t isa, int64_t threads) {
  const auto xd = x.dimensions(), td = table.dimensions();
  if (xd.size() != 2 || td.size() != 2 || xd[1] != td[1]) {
    return ffi::Error::InvalidArgument("grok_bf16_matmul_t expects x [m, k] and table [n, k]");
  }
  if (!IsaBuilt(isa)) return ffi::Error::InvalidArgument("grok_bf16_matmul_t: this build lacks the requested isa");
  const int64_t m = xd[0], k = xd[1], n = td[0];
  const uint16_t* xb = x.typed_data();
  float* out = y->typed_data();
  if (m == 0 || n == 0) return ffi::Error::Success();
  std::vector<float> xf;
  const bool avx512 = isa == kAvx512 || isa == kAvx512Fma, fma = isa == kAvx512Fma && m > 1;
  const int64_t kp = (k + 31) / 32 * 32;
  if (fma) {  // x as f32 in F32Fma's order of `in`, zero-padded
    xf.assign(m * kp, 0.0f);
    for (int64_t r = 0; r < m; ++r)
      for (int64_t i = 0; i < k; ++i) {
        const int64_t block = i / 32 * 32;
        xf[r * kp + block + kScrambledPosition[i % 32]] = Bf16ToF32(xb[r * k + i]);
      }
  } else if (!avx512) {
    xf.resize(m * k);
    for (int64_t i = 0; i < m * k; ++i) xf[i] = Bf16ToF32(xb[i]);
  }
  const int64_t tasks = (n + kTableRowsPerTask - 1) / kTableRowsPerTask;
  ParallelFor(pool, threads, tasks, [&](int64_t t) {
    const int64_t j0 = t * kTableRowsPerTask, j1 = std::min(n, j0 + kTableRowsPerTask);
#ifdef GROK_X86
    if (fma) return TableRows<F32Fma>(xf.data(), kp, m, k, table.typed_data(), j0, j1, n, out);
    if (avx512 && m == 1) return TableRowsAvx512One(xb, k, table.typed_data(), j0, j1, out);
    if (avx512) return TableRows<Bf16Pairs>(xb, k, m, k, table.typed_data(), j0, j1, n, out);
    if (isa == kAvx2) return TableRowsAvx2(xf.data(), m, k, table.typed_data(), j0, j1, n, out);
#endif
    TableRowsPortable(xf.data(), m, k, table.typed_data(), j0, j1, n, out);
  });
  return ffi::Error::Success();
}

}  // namespace


// The time of one vdpbf16ps over one 16-lane FMA, best of a few runs of about a millisecond
// (call only on a CPU with AVX-512 BF16). kAvx512 does one vdpbf16ps where kAvx512Fma does two
// FMAs: below 2 the bf16 pairs are faster.
extern "C" double GrokBf16DotCost() {
#ifdef GROK_X86
  constexpr int64_t kSteps = 100000;
  double bf16 = 1e30, fma = 1e30;
  for (int run = 0; run < 5; ++run) {
    bf16 = std::min(bf16, TimeChains<true>(kSteps));
    fma = std::min(fma, TimeChains<false>(kSteps));
  }
  return bf16 / fma;
#else
  return 0.0;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(GrokInt8Matmul, Int8Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("isa")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GrokBf16MatmulT, Bf16MatmulT,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("isa")
                                  .Attr<int64_t>("threads"));
