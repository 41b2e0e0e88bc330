// int8 x int8 -> int32 GEMM for x86-64 CPUs with AVX512-VNNI, as an XLA FFI custom call.
//
//   out[m, n] = sum_k x[m, k] * w[n, k]      x (M, K) int8, w (N, K) int8 (K-major: the
//                                             QuantizedKernel layout), out (M, N) int32
//
// Exact (the same numbers as XLA's int8 dot) for K <= 65536. vpdpbusd multiplies unsigned
// by signed bytes, so x is fed as x + 128 (x ^ 0x80) and 128 * sum_k w[n, k] is subtracted
// after the K loop; that intermediate stays below 255 * 128 * K < 2^31.
//
// Dot-product form on the stored layout (no packing pass, which would cost decode shapes
// a second read of the weight): a micro-tile of MR rows of x by 4 rows of w keeps MR * 4
// 16-lane accumulators over K and reduces them horizontally at the end, 4 at a time.
// Work is split into (row block, weight block) chunks shared through an atomic counter by
// the calling thread and XLA's intra-op thread pool.
//
// Compiled without -mavx512*: only the functions marked VNNI use those instructions, and
// Python calls them only where actquant_cpu_has_vnni() says the CPU has them.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

extern "C" int actquant_cpu_has_vnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

namespace {

constexpr int kNR = 4;             // weight rows per micro-tile
constexpr int64_t kRowBlock = 240;  // x rows per chunk (a multiple of every MR used)
constexpr int64_t kColBlock = 64;   // weight rows per chunk

// Sums of the 16 lanes of a0..a3 -> [sum a0, sum a1, sum a2, sum a3].
VNNI inline __m128i Reduce4(__m512i a0, __m512i a1, __m512i a2, __m512i a3) {
  __m512i s01 = _mm512_add_epi32(_mm512_unpacklo_epi32(a0, a1), _mm512_unpackhi_epi32(a0, a1));
  __m512i s23 = _mm512_add_epi32(_mm512_unpacklo_epi32(a2, a3), _mm512_unpackhi_epi32(a2, a3));
  __m512i s = _mm512_add_epi32(_mm512_unpacklo_epi64(s01, s23), _mm512_unpackhi_epi64(s01, s23));
  // Each 128-bit lane now holds [a0, a1, a2, a3] partial sums; add the four lanes.
  __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64(s, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

template <bool MASKED>
VNNI inline __m512i Load64(const int8_t* p, __mmask64 mask) {
  if constexpr (MASKED) {
    return _mm512_maskz_loadu_epi8(mask, p);
  } else {
    return _mm512_loadu_si512(p);
  }
}

// One 64-byte step of K for the tile. Masked-off tail bytes load as 0 in both operands:
// x's 0 ^ 0x80 = 128 times w's 0 adds nothing.
template <int MR, bool WSUM, bool MASKED>
VNNI inline void Step(__m512i (&acc)[MR][kNR], __m512i (&ws)[kNR], const int8_t* const* x_rows,
                      const int8_t* const* w_rows, int64_t k, __mmask64 mask) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i wv[kNR];
  for (int j = 0; j < kNR; ++j) {
    wv[j] = Load64<MASKED>(w_rows[j] + k, mask);
    if constexpr (WSUM) ws[j] = _mm512_dpbusd_epi32(ws[j], _mm512_set1_epi8(1), wv[j]);
  }
  for (int i = 0; i < MR; ++i) {
    __m512i xv = _mm512_xor_si512(Load64<MASKED>(x_rows[i] + k, mask), flip);
    for (int j = 0; j < kNR; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], xv, wv[j]);
  }
}

// MR rows of x (x_rows[i]) times 4 rows of w (w_rows[j]) over K. With WSUM the tile also
// computes 128 * sum_k w[j, k] into comp (the u8 offset correction); otherwise it uses it.
// Stores out[i * ldc + j] for i < MR and j < ncols.
template <int MR, bool WSUM>
VNNI void Tile(const int8_t* const* x_rows, const int8_t* const* w_rows, int64_t K, int32_t* out,
               int64_t ldc, int ncols, __m128i* comp) {
  __m512i acc[MR][kNR];
  __m512i ws[kNR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kNR; ++j) acc[i][j] = _mm512_setzero_si512();
  for (int j = 0; j < kNR; ++j) ws[j] = _mm512_setzero_si512();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) Step<MR, WSUM, false>(acc, ws, x_rows, w_rows, k, 0);
  if (k < K) {
    const __mmask64 mask = (1ULL << (K - k)) - 1;  // 1 <= K - k <= 63
    Step<MR, WSUM, true>(acc, ws, x_rows, w_rows, k, mask);
  }
  if constexpr (WSUM) *comp = _mm_slli_epi32(Reduce4(ws[0], ws[1], ws[2], ws[3]), 7);
  const __mmask8 store_mask = static_cast<__mmask8>((1u << ncols) - 1);
  for (int i = 0; i < MR; ++i) {
    __m128i r = _mm_sub_epi32(Reduce4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]), *comp);
    _mm_mask_storeu_epi32(out + i * ldc, store_mask, r);
  }
}

template <int MR>
VNNI void RunTile(bool first, const int8_t* const* xr, const int8_t* const* wr, int64_t K, int32_t* out,
                  int64_t ldc, int ncols, __m128i* comp) {
  if (first) {
    Tile<MR, true>(xr, wr, K, out, ldc, ncols, comp);
  } else {
    Tile<MR, false>(xr, wr, K, out, ldc, ncols, comp);
  }
}

// Rows [m0, m1) of out, weight rows [n0, n1).
VNNI void Chunk(const int8_t* x, const int8_t* w, int32_t* out, int64_t N, int64_t K, int64_t m0,
                int64_t m1, int64_t n0, int64_t n1) {
  const int8_t* xr[5];
  const int8_t* wr[kNR];
  for (int64_t n = n0; n < n1; n += kNR) {
    const int ncols = static_cast<int>(std::min<int64_t>(kNR, n1 - n));
    // Missing weight rows of a ragged tile repeat the last one (computed, not stored).
    for (int j = 0; j < kNR; ++j) wr[j] = w + (n + std::min(j, ncols - 1)) * K;
    __m128i comp;
    bool first = true;
    for (int64_t m = m0; m < m1;) {
      const int64_t rows = m1 - m;
      const int mr = rows >= 5 ? 5 : static_cast<int>(rows);
      for (int i = 0; i < mr; ++i) xr[i] = x + (m + i) * K;
      int32_t* o = out + m * N + n;
      switch (mr) {
        case 5: RunTile<5>(first, xr, wr, K, o, N, ncols, &comp); break;
        case 4: RunTile<4>(first, xr, wr, K, o, N, ncols, &comp); break;
        case 3: RunTile<3>(first, xr, wr, K, o, N, ncols, &comp); break;
        case 2: RunTile<2>(first, xr, wr, K, o, N, ncols, &comp); break;
        default: RunTile<1>(first, xr, wr, K, o, N, ncols, &comp); break;
      }
      first = false;
      m += mr;
    }
  }
}

struct Work {
  const int8_t* x;
  const int8_t* w;
  int32_t* out;
  int64_t M, N, K, row_blocks, chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Drain() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      const int64_t mb = c % row_blocks, nb = c / row_blocks;
      Chunk(x, w, out, N, K, mb * kRowBlock, std::min(M, (mb + 1) * kRowBlock), nb * kColBlock,
            std::min(N, (nb + 1) * kColBlock));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error S8GemmImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> w,
                      ffi::ResultBuffer<ffi::S32> out) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1]) {
    return ffi::Error::InvalidArgument("actquant s8_gemm: expected x (M, K) and w (N, K)");
  }
  const int64_t M = xd[0], K = xd[1], N = wd[0];
  if (K > 65536) return ffi::Error::InvalidArgument("actquant s8_gemm: K > 65536 may overflow int32");
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::fill(out->typed_data(), out->typed_data() + M * N, 0);
    return ffi::Error::Success();
  }
  auto work = std::make_shared<Work>();
  work->x = x.typed_data();
  work->w = w.typed_data();
  work->out = out->typed_data();
  work->M = M;
  work->N = N;
  work->K = K;
  work->row_blocks = (M + kRowBlock - 1) / kRowBlock;
  work->chunks = work->row_blocks * ((N + kColBlock - 1) / kColBlock);
  // Helpers that start late find no chunk left and return; the shared_ptr keeps the
  // counters alive for them. The caller works too, so a busy pool cannot stall it.
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, work->chunks - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work] { work->Drain(); });
  work->Drain();
  while (work->done.load(std::memory_order_acquire) < work->chunks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ActquantS8Gemm, S8GemmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
