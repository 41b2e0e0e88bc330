// int8 x int8 -> int32 GEMM for x86-64 CPUs (AVX512-VNNI, or AVX2), as an XLA FFI custom call.
//
//   out[m, n] = sum_k x[m, k] * w[n, k]      x (M, K) int8, w (N, K) int8 (K-major: the
//                                             QuantizedKernel layout), out (M, N) int32
//   marked[m] = NaN if row m of x holds -128, else 0     (M,) f32
// for one x and G >= 1 weights in one call (a group reading one input: q/k/v, gate/up).
//
// -128 is the mark of a non-finite input (reference.NONFINITE_MARK): the quantizer never
// emits it otherwise, and `marked` added to the row scales turns such rows into NaN rows.
// Found while x is read for the offset sums (prefill) or in a pass over the few rows
// (decode): no extra pass of XLA over the float input.
//
// Exact (the same numbers as XLA's int8 dot) for K <= 65536. vpdpbusd multiplies unsigned
// by signed bytes, so one operand is offset by 128 (xor 0x80) and 128 times the sums of
// the other is subtracted after the K loop; that intermediate stays below 255*128*K < 2^31.
//
// Two paths, by shape:
// - few rows (decode): dot-product form on the stored layout, no packing pass (it would
//   cost a second read of the weight): a micro-tile of MR rows of x by 4 rows of w keeps
//   MR * 4 16-lane accumulators over K and reduces them horizontally at the end.
// - many rows (prefill): the weight is packed once per call for an outer-product
//   micro-kernel (16 outputs per register, no horizontal sums): ~650 GOP/s on 2 Zen 4
//   cores, against ~250 for XLA's int8 dot and ~200 GFLOP/s for its f32 GEMM.
// Work is split into chunks shared through an atomic counter by the calling thread and
// XLA's intra-op thread pool.
//
// Also here: quantize_rows, the per-row int8 quantization of f32 x, dynamic or static (see
// QuantizeRows; with the online Hadamard rotation: RotateRow), and marked_rows, the mark
// scan alone.
//
// Compiled without -mavx512* / -mavx2: only the functions marked VNNI (AVX2) use those
// instructions, and they run only where actquant_cpu_int8_isa() says the CPU has them.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <vector>
#include <cmath>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#define UNROLL _Pragma("GCC unroll 16")
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

// The jaxlib whose FFI headers this library was compiled against (setup.py passes it);
// cpu_kernels compares it with the jaxlib it runs with.
#ifndef ACTQUANT_JAXLIB_VERSION
#define ACTQUANT_JAXLIB_VERSION "unknown"
#endif
extern "C" const char* actquant_built_against_jaxlib() { return ACTQUANT_JAXLIB_VERSION; }
// sha256 of this file as built (a stale in-place build of an editable install is rebuilt).
#ifndef ACTQUANT_SOURCE_SHA256
#define ACTQUANT_SOURCE_SHA256 "unknown"
#endif
extern "C" const char* actquant_source_sha256() { return ACTQUANT_SOURCE_SHA256; }

// The int8 GEMM paths this CPU runs: 2 AVX512-VNNI, 1 AVX2 (+FMA), 0 neither (no GEMM).
// ACTQUANT_CPU_NO_VNNI=1 (tests): the AVX2 paths on a CPU that has AVX512-VNNI too.
extern "C" int actquant_cpu_int8_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512vnni") && std::getenv("ACTQUANT_CPU_NO_VNNI") == nullptr) {
    return 2;
  }
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
}

namespace {

// acc += u8 bytes of a times s8 bytes of b, 4 per lane. Inline asm ties acc to its
// register: GCC 12 turns the intrinsic into copies and spills in these loops (3x slower).
VNNI inline void Dp(__m512i& acc, __m512i a_u8, __m512i b_s8) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a_u8), "v"(b_s8));
}

constexpr int kNR = 4;             // weight rows per micro-tile
constexpr int64_t kRowBlock = 240;  // x rows per chunk (a multiple of the micro-tile's 4)
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
  UNROLL for (int j = 0; j < kNR; ++j) {
    wv[j] = Load64<MASKED>(w_rows[j] + k, mask);
    if constexpr (WSUM) ws[j] = _mm512_dpbusd_epi32(ws[j], _mm512_set1_epi8(1), wv[j]);
  }
  UNROLL for (int i = 0; i < MR; ++i) {
    __m512i xv = _mm512_xor_si512(Load64<MASKED>(x_rows[i] + k, mask), flip);
    UNROLL for (int j = 0; j < kNR; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], xv, wv[j]);
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
  // The 4 weight rows of the next tile (contiguous after these: 4 * K bytes ahead) are
  // prefetched as these are read: the hardware prefetcher alone left DRAM bandwidth unused.
  const int8_t* ahead = w_rows[kNR - 1] + K;
  for (; k + 64 <= K; k += 64) {
    UNROLL for (int j = 0; j < kNR; ++j) _mm_prefetch(reinterpret_cast<const char*>(ahead + j * K + k), _MM_HINT_T0);
    Step<MR, WSUM, false>(acc, ws, x_rows, w_rows, k, 0);
  }
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
  const int8_t* xr[4];
  const int8_t* wr[kNR];
  for (int64_t n = n0; n < n1; n += kNR) {
    const int ncols = static_cast<int>(std::min<int64_t>(kNR, n1 - n));
    // Missing weight rows of a ragged tile repeat the last one (computed, not stored).
    for (int j = 0; j < kNR; ++j) wr[j] = w + (n + std::min(j, ncols - 1)) * K;
    __m128i comp;
    bool first = true;
    for (int64_t m = m0; m < m1;) {
      const int64_t rows = m1 - m;
      // 4 rows: 16 accumulators + 4 weight sums + 4 weight vectors fit the 32 registers
      // (5 spills: 25% slower, measured).
      const int mr = rows >= 4 ? 4 : static_cast<int>(rows);
      for (int i = 0; i < mr; ++i) xr[i] = x + (m + i) * K;
      int32_t* o = out + m * N + n;
      switch (mr) {
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

// ---- Prefill path: outer-product micro-kernel on a packed weight.
//
// For many rows the weight is packed once per call into 64-column panels, K in groups of
// 4 bytes: panel[g][c][0..3] = w[n0 + c, 4g .. 4g + 3] ^ 0x80 (u8 = w + 128; zero past N
// and K). One 64-byte load then holds 16 columns x 4 k, a 4-byte broadcast of x row i
// multiplies it, and 16 outputs accumulate per register with no horizontal reduction.
// Here w carries the offset: out = acc - 128 * sum_k x[m, k].

constexpr int kMRP = 6;             // x rows per packed micro-tile
constexpr int64_t kPanel = 64;      // packed weight columns per panel (4 registers)
constexpr int64_t kRowBlockP = 240;  // x rows per chunk (a multiple of kMRP)
// Packing reads and writes the weight once per call: worth it from about 128 rows, or
// from 48 when the weight is small enough (<= 4 MiB) to be packed from cache (measured).
inline bool UsePacked(int64_t M, int64_t N, int64_t K) { return M >= 128 || (M >= 48 && N * K <= (1 << 22)); }

// 4 bytes of x row from k (zero past K: the packed weight is zero there too, but the
// bytes must not be read past the row's end).
inline int32_t Group4(const int8_t* row, int64_t k, int64_t K) {
  int32_t v = 0;
  std::memcpy(&v, row + k, static_cast<size_t>(std::min<int64_t>(4, K - k)));
  return v;
}

void PackPanel(const int8_t* w, int64_t N, int64_t K, int64_t p, uint8_t* dst) {
  const int64_t full = K / 4, groups = (K + 3) / 4;
  // Only real bytes get the 0x80 offset; padding past K stays 0 (adds nothing).
  const uint32_t tail_flip = 0x80808080u & static_cast<uint32_t>((1ULL << (8 * (K - 4 * full))) - 1);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
  for (int64_t c = 0; c < kPanel; ++c) {
    const int64_t n = p * kPanel + c;
    if (n >= N) {
      for (int64_t g = 0; g < groups; ++g) d[g * kPanel + c] = 0;
      continue;
    }
    const int8_t* row = w + n * K;
    for (int64_t g = 0; g < full; ++g) {
      uint32_t v;
      std::memcpy(&v, row + 4 * g, 4);
      d[g * kPanel + c] = v ^ 0x80808080u;
    }
    if (full < groups) d[full * kPanel + c] = static_cast<uint32_t>(Group4(row, 4 * full, K)) ^ tail_flip;
  }
}

// 128 * sum_k x[m, k] into comp (when given) and the mark flags of rows [m0, m1).
VNNI void RowSums(const int8_t* x, int64_t K, int64_t m0, int64_t m1, int32_t* comp, float* marked) {
  const __m512i ones = _mm512_set1_epi8(1), mark = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t m = m0; m < m1; ++m) {
    const int8_t* row = x + m * K;
    __m512i acc = _mm512_setzero_si512();
    __mmask64 seen = 0;
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
      const __m512i v = _mm512_loadu_si512(row + k);
      seen |= _mm512_cmpeq_epi8_mask(v, mark);
      if (comp) Dp(acc, ones, v);
    }
    if (k < K) {
      const __mmask64 tail = (1ULL << (K - k)) - 1;
      const __m512i v = _mm512_maskz_loadu_epi8(tail, row + k);
      seen |= _mm512_mask_cmpeq_epi8_mask(tail, v, mark);
      if (comp) Dp(acc, ones, v);
    }
    if (comp) comp[m] = 128 * _mm512_reduce_add_epi32(acc);
    marked[m] = seen ? std::numeric_limits<float>::quiet_NaN() : 0.0f;
  }
}

template <int MR>
VNNI inline void PackedStep(__m512i (&acc)[MR][4], const uint8_t* panel_g, const int32_t* bytes) {
  const __m512i* b = reinterpret_cast<const __m512i*>(panel_g);
  const __m512i b0 = _mm512_loadu_si512(b), b1 = _mm512_loadu_si512(b + 1);
  const __m512i b2 = _mm512_loadu_si512(b + 2), b3 = _mm512_loadu_si512(b + 3);
  UNROLL for (int i = 0; i < MR; ++i) {
    const __m512i a = _mm512_set1_epi32(bytes[i]);
    Dp(acc[i][0], b0, a);
    Dp(acc[i][1], b1, a);
    Dp(acc[i][2], b2, a);
    Dp(acc[i][3], b3, a);
  }
}

template <int MR>
VNNI void PackedTile(const int8_t* x, int64_t K, const uint8_t* panel, const int32_t* comp, int32_t* out,
                     int64_t ldc, int64_t ncols) {
  __m512i acc[MR][4];
  UNROLL for (int i = 0; i < MR; ++i) {
    UNROLL for (int v = 0; v < 4; ++v) acc[i][v] = _mm512_setzero_si512();
  }
  const int64_t full = K / 4;
  int32_t bytes[MR];
  for (int64_t g = 0; g < full; ++g) {
    UNROLL for (int i = 0; i < MR; ++i) std::memcpy(&bytes[i], x + i * K + 4 * g, 4);
    PackedStep<MR>(acc, panel + g * kPanel * 4, bytes);
  }
  if (full * 4 < K) {  // the last 1-3 bytes of each row, zero-padded (not read past the row)
    UNROLL for (int i = 0; i < MR; ++i) bytes[i] = Group4(x + i * K, 4 * full, K);
    PackedStep<MR>(acc, panel + full * kPanel * 4, bytes);
  }
  UNROLL for (int i = 0; i < MR; ++i) {
    const __m512i c = _mm512_set1_epi32(comp[i]);
    UNROLL for (int v = 0; v < 4; ++v) {
      const int64_t left = ncols - 16 * v;
      if (left <= 0) break;
      const __mmask16 mask = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
      _mm512_mask_storeu_epi32(out + i * ldc + 16 * v, mask, _mm512_sub_epi32(acc[i][v], c));
    }
  }
}

// Rows [m0, m1) of out against packed panel p.
VNNI void PackedChunk(const int8_t* x, const uint8_t* packed, const int32_t* comp, int32_t* out, int64_t N,
                      int64_t K, int64_t m0, int64_t m1, int64_t p) {
  const uint8_t* panel = packed + p * ((K + 3) / 4) * kPanel * 4;
  const int64_t n0 = p * kPanel, ncols = std::min(kPanel, N - n0);
  for (int64_t m = m0; m < m1;) {
    const int mr = static_cast<int>(std::min<int64_t>(kMRP, m1 - m));
    const int8_t* xm = x + m * K;
    int32_t* o = out + m * N + n0;
    switch (mr) {
      case 6: PackedTile<6>(xm, K, panel, comp + m, o, N, ncols); break;
      case 5: PackedTile<5>(xm, K, panel, comp + m, o, N, ncols); break;
      case 4: PackedTile<4>(xm, K, panel, comp + m, o, N, ncols); break;
      case 3: PackedTile<3>(xm, K, panel, comp + m, o, N, ncols); break;
      case 2: PackedTile<2>(xm, K, panel, comp + m, o, N, ncols); break;
      default: PackedTile<1>(xm, K, panel, comp + m, o, N, ncols); break;
    }
    m += mr;
  }
}

// ---- Per-row int8 quantization, dynamic or static.

// Per-row int8 quantization of f32 x (M, K), the numbers of
// reference.quantize_rows_ref(x, inv_smooth, scale=...) bit for bit:
//   c[k]  = |inv[k]| * f32(1/127);   amax = max_k |x[m, k]| * c[k]   (0 for K = 0)
//   dynamic (scale null): sx[m] = 1 if amax < FLT_MIN; amax if amax <= 2^126; else NaN
//   static: sx[m] = max(*scale, amax < FLT_MIN ? 0 : amax) (reference.static_row_scale:
//           a row beyond the calibrated scale gets its own); NaN if amax > 2^126
//   xq    = saturate(round_half_even(x * (inv[k] * (1 / sx))))
// A row holding NaN or Inf gets sx = NaN and every element -128 (the mark), so both the
// scale and the mark signal it. One pass over memory: the second read of a row (K * 4
// bytes) hits L1. XLA fuses a reduction and an elementwise pass separately, recomputing
// x's producer in each (an erf GELU, three times over on MiniLM) or reading x twice.
// The row scale from amax (see above); NaN for a row holding NaN / Inf (bad).
inline float RowScale(float mx, bool bad, const float* scale) {
  const float tiny = std::numeric_limits<float>::min();
  float s = scale == nullptr ? (mx < tiny ? 1.0f : mx) : std::max(*scale, mx < tiny ? 0.0f : mx);
  if (bad || !(mx <= 0x1p126f)) s = std::numeric_limits<float>::quiet_NaN();
  return s;
}

VNNI void QuantizeRows(const float* x, const float* inv, int64_t K, int64_t m0, int64_t m1, int8_t* xq,
                       float* sx, const float* scale) {
  const __m512 c_scalar = _mm512_set1_ps(static_cast<float>(1.0 / 127.0));
  const __m512 inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
  for (int64_t m = m0; m < m1; ++m) {
    const float* row = x + m * K;
    int8_t* out = xq + m * K;
    __m512 amax = _mm512_setzero_ps();
    __mmask16 bad = 0;
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 t = K - k >= 16 ? 0xffff : static_cast<__mmask16>((1u << (K - k)) - 1);
      const __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(t, row + k));
      const __m512 c = _mm512_mul_ps(_mm512_abs_ps(_mm512_maskz_loadu_ps(t, inv + k)), c_scalar);
      bad |= _mm512_mask_cmp_ps_mask(t, a, inf, _CMP_NLT_UQ);  // NaN or Inf
      amax = _mm512_max_ps(amax, _mm512_mul_ps(a, c));
    }
    const float s = RowScale(_mm512_reduce_max_ps(amax), bad != 0, scale);
    sx[m] = s;
    if (s != s) {
      std::memset(out, 0x80, K);
      continue;
    }
    const __m512 r = _mm512_set1_ps(1.0f / s);
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 t = K - k >= 16 ? 0xffff : static_cast<__mmask16>((1u << (K - k)) - 1);
      const __m512 f = _mm512_mul_ps(_mm512_maskz_loadu_ps(t, inv + k), r);
      __m512 y = _mm512_mul_ps(_mm512_maskz_loadu_ps(t, row + k), f);
      y = _mm512_min_ps(_mm512_max_ps(y, lo), hi);
      // cvtps rounds half to even (the default MXCSR mode); |y| <= 127 packs exactly.
      _mm_mask_storeu_epi8(out + k, t, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(y)));
    }
  }
}

// ---- AVX2 paths: the same GEMM, quantize pass and mark scan for x86-64 CPUs without
// AVX512-VNNI (AMD Zen 1-3, Intel before Ice Lake), bit for bit the same numbers.
//
// vpmaddubsw multiplies unsigned by signed bytes and adds pairs into saturating int16.
// The unsigned operand is |w| (vpabsb: 0..128, -128 included) and the signed one x with
// w's sign (vpsignb: x where w > 0, -x where w < 0, 0 where w = 0), so each product is
// x * w and a pair is at most 2 * 128 * 127 = 32512 < 2^15: no saturation for any weight
// and any x in [-127, 127]. The one x value that -x wraps, -128, is the non-finite mark,
// whose rows become NaN rows whatever they accumulate. vpmaddwd by ones then adds pairs
// of pairs into int32: 4 products per lane, as vpdpbusd, with no offset to correct.
//
// 16 vector registers (not 32): the decode tile is 2 rows of x by 4 rows of w, the packed
// prefill tile 4 rows of x by 16 columns (panels of 16 columns, K in groups of 4 bytes,
// w stored as is).

#define AVX2 __attribute__((target("avx2,fma")))

const bool kHasVnni = actquant_cpu_int8_isa() == 2;

// acc += 4-byte groups of x . w per int32 lane (see above); absw = |w|.
AVX2 inline __m256i DotAvx2(__m256i acc, __m256i absw, __m256i w, __m256i x) {
  const __m256i pairs = _mm256_maddubs_epi16(absw, _mm256_sign_epi8(x, w));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

// [sum a0, sum a1, sum a2, sum a3] of 8 int32 lanes each.
AVX2 inline __m128i Reduce4Avx2(__m256i a0, __m256i a1, __m256i a2, __m256i a3) {
  const __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
  return _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
}

// 32 bytes from p, or the n < 32 left of a row zero-padded (not read past its end).
AVX2 inline __m256i Load32(const int8_t* p, int64_t n) {
  if (n >= 32) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  alignas(32) int8_t buf[32] = {};
  std::memcpy(buf, p, static_cast<size_t>(n));
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(buf));
}

// MR (1 or 2) rows of x by 4 rows of w over K -> out[i * ldc + j], j < ncols.
template <int MR>
AVX2 void TileAvx2(const int8_t* const* x_rows, const int8_t* const* w_rows, int64_t K, int32_t* out, int64_t ldc,
                   int ncols) {
  __m256i acc[MR][kNR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kNR; ++j) acc[i][j] = _mm256_setzero_si256();
  const int8_t* ahead = w_rows[kNR - 1] + K;  // the next tile's rows, prefetched as these are read
  // Full 32-byte steps with plain loads, then the tail (zero-padded copies) once: a copy
  // inside the loop made GCC keep the accumulators in memory (3 stores a step, 30% slower).
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m256i xv[MR];
    UNROLL for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x_rows[i] + k));
    UNROLL for (int j = 0; j < kNR; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(ahead + j * K + k), _MM_HINT_T0);
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w_rows[j] + k));
      const __m256i absw = _mm256_abs_epi8(w);
      UNROLL for (int i = 0; i < MR; ++i) acc[i][j] = DotAvx2(acc[i][j], absw, w, xv[i]);
    }
  }
  if (k < K) {
    __m256i xv[MR];
    UNROLL for (int i = 0; i < MR; ++i) xv[i] = Load32(x_rows[i] + k, K - k);
    UNROLL for (int j = 0; j < kNR; ++j) {
      const __m256i w = Load32(w_rows[j] + k, K - k), absw = _mm256_abs_epi8(w);
      UNROLL for (int i = 0; i < MR; ++i) acc[i][j] = DotAvx2(acc[i][j], absw, w, xv[i]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    alignas(16) int32_t r[4];
    _mm_store_si128(reinterpret_cast<__m128i*>(r), Reduce4Avx2(acc[i][0], acc[i][1], acc[i][2], acc[i][3]));
    std::memcpy(out + i * ldc, r, sizeof(int32_t) * ncols);
  }
}

AVX2 void ChunkAvx2(const int8_t* x, const int8_t* w, int32_t* out, int64_t N, int64_t K, int64_t m0, int64_t m1,
                    int64_t n0, int64_t n1) {
  const int8_t* xr[2];
  const int8_t* wr[kNR];
  for (int64_t n = n0; n < n1; n += kNR) {
    const int ncols = static_cast<int>(std::min<int64_t>(kNR, n1 - n));
    for (int j = 0; j < kNR; ++j) wr[j] = w + (n + std::min(j, ncols - 1)) * K;
    for (int64_t m = m0; m < m1;) {
      const int mr = m1 - m >= 2 ? 2 : 1;
      for (int i = 0; i < mr; ++i) xr[i] = x + (m + i) * K;
      if (mr == 2) {
        TileAvx2<2>(xr, wr, K, out + m * N + n, N, ncols);
      } else {
        TileAvx2<1>(xr, wr, K, out + m * N + n, N, ncols);
      }
      m += mr;
    }
  }
}

constexpr int kMRP2 = 4;         // x rows per packed AVX2 micro-tile
constexpr int64_t kPanel2 = 16;  // packed columns per panel (2 registers)

// panel[g][c][0..3] = w[n0 + c, 4g .. 4g + 3] (zero past N and K).
void PackPanelAvx2(const int8_t* w, int64_t N, int64_t K, int64_t p, uint8_t* dst) {
  const int64_t groups = (K + 3) / 4;
  int32_t* d = reinterpret_cast<int32_t*>(dst);
  for (int64_t c = 0; c < kPanel2; ++c) {
    const int64_t n = p * kPanel2 + c;
    for (int64_t g = 0; g < groups; ++g) d[g * kPanel2 + c] = n < N ? Group4(w + n * K, 4 * g, K) : 0;
  }
}

template <int MR>
AVX2 void PackedTileAvx2(const int8_t* x, int64_t K, const uint8_t* panel, int32_t* out, int64_t ldc,
                         int64_t ncols) {
  __m256i acc[MR][2];
  UNROLL for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
  const int64_t full = K / 4, groups = (K + 3) / 4;
  for (int64_t g = 0; g < groups; ++g) {
    const __m256i* b = reinterpret_cast<const __m256i*>(panel + g * kPanel2 * 4);
    const __m256i b0 = _mm256_loadu_si256(b), b1 = _mm256_loadu_si256(b + 1);
    const __m256i a0 = _mm256_abs_epi8(b0), a1 = _mm256_abs_epi8(b1);
    UNROLL for (int i = 0; i < MR; ++i) {
      int32_t bytes;
      if (g < full) {
        std::memcpy(&bytes, x + i * K + 4 * g, 4);
      } else {
        bytes = Group4(x + i * K, 4 * g, K);  // the last 1-3 bytes, zero-padded
      }
      const __m256i xv = _mm256_set1_epi32(bytes);
      acc[i][0] = DotAvx2(acc[i][0], a0, b0, xv);
      acc[i][1] = DotAvx2(acc[i][1], a1, b1, xv);
    }
  }
  UNROLL for (int i = 0; i < MR; ++i) {
    alignas(32) int32_t r[kPanel2];
    _mm256_store_si256(reinterpret_cast<__m256i*>(r), acc[i][0]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(r + 8), acc[i][1]);
    std::memcpy(out + i * ldc, r, sizeof(int32_t) * ncols);
  }
}

AVX2 void PackedChunkAvx2(const int8_t* x, const uint8_t* packed, int32_t* out, int64_t N, int64_t K, int64_t m0,
                          int64_t m1, int64_t p) {
  const uint8_t* panel = packed + p * ((K + 3) / 4) * kPanel2 * 4;
  const int64_t n0 = p * kPanel2, ncols = std::min(kPanel2, N - n0);
  for (int64_t m = m0; m < m1;) {
    const int mr = static_cast<int>(std::min<int64_t>(kMRP2, m1 - m));
    const int8_t* xm = x + m * K;
    int32_t* o = out + m * N + n0;
    switch (mr) {
      case 4: PackedTileAvx2<4>(xm, K, panel, o, N, ncols); break;
      case 3: PackedTileAvx2<3>(xm, K, panel, o, N, ncols); break;
      case 2: PackedTileAvx2<2>(xm, K, panel, o, N, ncols); break;
      default: PackedTileAvx2<1>(xm, K, panel, o, N, ncols); break;
    }
    m += mr;
  }
}

// The mark flags of rows [m0, m1) (RowSums without the offset sums).
AVX2 void MarksAvx2(const int8_t* x, int64_t K, int64_t m0, int64_t m1, float* marked) {
  const __m256i mark = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t m = m0; m < m1; ++m) {
    const int8_t* row = x + m * K;
    __m256i seen = _mm256_setzero_si256();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      seen = _mm256_or_si256(seen, _mm256_cmpeq_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k)),
                                                     mark));
    }
    bool any = _mm256_movemask_epi8(seen) != 0;
    for (; k < K; ++k) any |= row[k] == static_cast<int8_t>(0x80);
    marked[m] = any ? std::numeric_limits<float>::quiet_NaN() : 0.0f;
  }
}

// 8 floats from p, or the n < 8 left of a row zero-padded.
AVX2 inline __m256 Load8F(const float* p, int64_t n) {
  if (n >= 8) return _mm256_loadu_ps(p);
  alignas(32) float buf[8] = {};
  std::memcpy(buf, p, sizeof(float) * n);
  return _mm256_load_ps(buf);
}

// QuantizeRows in AVX2: the same operations in the same order, 8 lanes at a time (the
// tail through a zero-padded copy: 0 * 0 adds nothing to the max), so the same bits.
AVX2 void QuantizeRowsAvx2(const float* x, const float* inv, int64_t K, int64_t m0, int64_t m1, int8_t* xq,
                           float* sx, const float* scale) {
  const __m256 c_scalar = _mm256_set1_ps(static_cast<float>(1.0 / 127.0));
  const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  for (int64_t m = m0; m < m1; ++m) {
    const float* row = x + m * K;
    int8_t* out = xq + m * K;
    __m256 amax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
      const __m256 a = _mm256_and_ps(Load8F(row + k, K - k), absmask);
      const __m256 c = _mm256_mul_ps(_mm256_and_ps(Load8F(inv + k, K - k), absmask), c_scalar);
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ));  // NaN or Inf
      amax = _mm256_max_ps(amax, _mm256_mul_ps(a, c));
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    const float s = RowScale(_mm_cvtss_f32(h), _mm256_movemask_ps(bad) != 0, scale);
    sx[m] = s;
    if (s != s) {
      std::memset(out, 0x80, K);
      continue;
    }
    const __m256 r = _mm256_set1_ps(1.0f / s);
    for (int64_t k = 0; k < K; k += 8) {
      const __m256 f = _mm256_mul_ps(Load8F(inv + k, K - k), r);
      __m256 y = _mm256_mul_ps(Load8F(row + k, K - k), f);
      y = _mm256_min_ps(_mm256_max_ps(y, lo), hi);
      const __m256i v = _mm256_cvtps_epi32(y);  // half to even (the default MXCSR mode)
      const __m128i v16 = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
      const __m128i v8 = _mm_packs_epi16(v16, v16);
      if (K - k >= 8) {
        _mm_storel_epi64(reinterpret_cast<__m128i*>(out + k), v8);
      } else {
        alignas(16) int8_t buf[16];
        _mm_store_si128(reinterpret_cast<__m128i*>(buf), v8);
        std::memcpy(out + k, buf, static_cast<size_t>(K - k));
      }
    }
  }
}

// ---- Parallel loop over chunks: the calling thread and XLA's intra-op pool.

struct Counters {
  int64_t chunks;
  std::function<void(int64_t)> body;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Drain() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      body(c);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Runs body(0 .. chunks-1). Helpers that start late find no chunk left and return (the
// shared_ptr keeps the counters alive for them; they never touch the body's data). The
// caller works too, so a busy pool cannot stall it.
void ParallelFor(ffi::ThreadPool& pool, int64_t chunks, std::function<void(int64_t)> body) {
  auto work = std::make_shared<Counters>();
  work->chunks = chunks;
  work->body = std::move(body);
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, chunks - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work] { work->Drain(); });
  work->Drain();
  while (work->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

// Marks of rows m0..m1 of x: RowSums' (VNNI) or MarksAvx2.
void Marks(const int8_t* x, int64_t K, int64_t m0, int64_t m1, float* marked) {
  if (kHasVnni) {
    RowSums(x, K, m0, m1, nullptr, marked);
  } else {
    MarksAvx2(x, K, m0, m1, marked);
  }
}

// Many rows: the weight packed once per call for the outer-product tile (the marks found
// as x is read for it).
void PackedGemm(ffi::ThreadPool& pool, const int8_t* x, const int8_t* w, int32_t* out, int64_t M, int64_t N, int64_t K,
                float* marked) {
  if (!kHasVnni) {
    const int64_t panels = (N + kPanel2 - 1) / kPanel2, panel_bytes = ((K + 3) / 4) * kPanel2 * 4;
    const int64_t row_blocks = (M + kRowBlockP - 1) / kRowBlockP;
    std::unique_ptr<uint8_t[]> packed(new uint8_t[panels * panel_bytes]);
    ParallelFor(pool, panels + row_blocks, [&](int64_t c) {
      if (c < panels) {
        PackPanelAvx2(w, N, K, c, packed.get() + c * panel_bytes);
      } else {
        const int64_t m0 = (c - panels) * kRowBlockP;
        MarksAvx2(x, K, m0, std::min(M, m0 + kRowBlockP), marked);
      }
    });
    ParallelFor(pool, row_blocks * panels, [&](int64_t c) {
      const int64_t mb = c % row_blocks, p = c / row_blocks;
      PackedChunkAvx2(x, packed.get(), out, N, K, mb * kRowBlockP, std::min(M, (mb + 1) * kRowBlockP), p);
    });
    return;
  }
  const int64_t panels = (N + kPanel - 1) / kPanel, panel_bytes = ((K + 3) / 4) * kPanel * 4;
  const int64_t row_blocks = (M + kRowBlockP - 1) / kRowBlockP;
  std::unique_ptr<uint8_t[]> packed(new uint8_t[panels * panel_bytes]);
  std::unique_ptr<int32_t[]> comp(new int32_t[M]);
  ParallelFor(pool, panels + row_blocks, [&](int64_t c) {
    if (c < panels) {
      PackPanel(w, N, K, c, packed.get() + c * panel_bytes);
    } else {
      const int64_t mb = c - panels;
      RowSums(x, K, mb * kRowBlockP, std::min(M, (mb + 1) * kRowBlockP), comp.get(), marked);
    }
  });
  ParallelFor(pool, row_blocks * panels, [&](int64_t c) {
    const int64_t mb = c % row_blocks, p = c / row_blocks;
    PackedChunk(x, packed.get(), comp.get(), out, N, K, mb * kRowBlockP, std::min(M, (mb + 1) * kRowBlockP), p);
  });
}

struct GemmOperand {
  const int8_t* w;  // (N, K): the layer's, inside a stack
  int32_t* out;     // (M, N)
  int64_t N;
};

// x (M, K) times G weights w_g (N_g, K), or stacks (L, N_g, K) of scanned layers' weights
// of which layer `layer` is read in place (a slice of it taken in XLA would be a copy of
// the weight every step) -> out_g (M, N_g) and the marks. The G products of one x (q/k/v,
// gate/up) are one call: at a few rows their chunks share one parallel loop (one wake-up
// of the pool, and the small ones' columns fill the cores), and x's marks are found once.
ffi::Error S8GemmImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x_buf, ffi::Buffer<ffi::S32> layer_buf,
                      ffi::RemainingArgs w_bufs, ffi::ResultBuffer<ffi::F32> marked_buf, ffi::RemainingRets out_bufs) {
  auto xd = x_buf.dimensions();
  if (xd.size() != 2 || layer_buf.element_count() != 1 || w_bufs.size() == 0 || w_bufs.size() != out_bufs.size()) {
    return ffi::Error::InvalidArgument("actquant s8_gemm: expected x (M, K), layer (), G >= 1 weights and G outputs");
  }
  const int64_t M = xd[0], K = xd[1];
  if (K > 65536) return ffi::Error::InvalidArgument("actquant s8_gemm: K > 65536 may overflow int32");
  const int64_t layer = layer_buf.typed_data()[0];
  std::vector<GemmOperand> ops;
  for (size_t g = 0; g < w_bufs.size(); ++g) {
    auto w = w_bufs.get<ffi::Buffer<ffi::S8>>(g);
    if (!w.has_value()) return w.error();
    auto o = out_bufs.get<ffi::Buffer<ffi::S32>>(g);
    if (!o.has_value()) return o.error();
    auto wd = w->dimensions();
    const size_t wr = wd.size();
    if ((wr != 2 && wr != 3) || wd[wr - 1] != K) {
      return ffi::Error::InvalidArgument("actquant s8_gemm: expected w (N, K) or (L, N, K)");
    }
    if (layer < 0 || (wr == 3 ? layer >= wd[0] : layer != 0)) {
      return ffi::Error::InvalidArgument("actquant s8_gemm: layer out of range");
    }
    const int64_t N = wd[wr - 2];
    ops.push_back({w->typed_data() + layer * N * K, (*o)->typed_data(), N});
  }
  const int8_t* x = x_buf.typed_data();
  float* marked = marked_buf->typed_data();
  if (M == 0) return ffi::Error::Success();
  bool marks_found = false;
  std::vector<GemmOperand> few;  // the decode form's operands
  for (const GemmOperand& op : ops) {
    if (K == 0) {
      std::fill(op.out, op.out + M * op.N, 0);
    } else if (op.N > 0 && UsePacked(M, op.N, K)) {
      PackedGemm(pool, x, op.w, op.out, M, op.N, K, marked);
      marks_found = true;
    } else if (op.N > 0) {
      few.push_back(op);
    }
  }
  // few rows: the marks in a pass over M * K bytes, next to N * K of weight
  if (!marks_found) Marks(x, K, 0, M, marked);
  if (few.empty()) return ffi::Error::Success();
  const int64_t row_blocks = (M + kRowBlock - 1) / kRowBlock;
  std::vector<int64_t> first(few.size() + 1, 0);  // chunk numbers by operand
  for (size_t g = 0; g < few.size(); ++g) first[g + 1] = first[g] + row_blocks * ((few[g].N + kColBlock - 1) / kColBlock);
  ParallelFor(pool, first.back(), [&](int64_t c) {
    const size_t g = std::upper_bound(first.begin(), first.end(), c) - first.begin() - 1;
    const GemmOperand& op = few[g];
    const int64_t local = c - first[g], mb = local % row_blocks, nb = local / row_blocks;
    const int64_t m0 = mb * kRowBlock, m1 = std::min(M, m0 + kRowBlock);
    const int64_t n0 = nb * kColBlock, n1 = std::min(op.N, n0 + kColBlock);
    if (kHasVnni) {
      Chunk(x, op.w, op.out, op.N, K, m0, m1, n0, n1);
    } else {
      ChunkAvx2(x, op.w, op.out, op.N, K, m0, m1, n0, n1);
    }
  });
  return ffi::Error::Success();
}

// marked[m] alone (the S8Gemm output), for an int8 x another GEMM consumes (XLA's on
// AMX CPUs): one pass over the bytes, in row blocks over the pool.
ffi::Error MarkedRowsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x_buf, ffi::ResultBuffer<ffi::F32> marked_buf) {
  auto xd = x_buf.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("actquant marked_rows: expected x (M, K)");
  const int64_t M = xd[0], K = xd[1];
  const int8_t* x = x_buf.typed_data();
  float* marked = marked_buf->typed_data();
  const int64_t blocks = (M + kRowBlockP - 1) / kRowBlockP;
  if (blocks > 0) {
    ParallelFor(pool, blocks, [&](int64_t c) {
      const int64_t m0 = c * kRowBlockP;
      Marks(x, K, m0, std::min(M, m0 + kRowBlockP), marked);
    });
  }
  return ffi::Error::Success();
}

// ---- The online Hadamard rotation of a row before it is quantized (actquant_jax/rotation.py):
//   x R = ((x * inv * signs) viewed (m, p)) -> H_p / sqrt(p) along p -> H_m / sqrt(m) across m
// R = diag(signs) (H_m kron H_p) / sqrt(K). H_p (Sylvester, natural order) is applied by
// p log p butterflies; H_m (hm, given scaled: a Paley order or 1) densely, y[c, :] =
// sum_a hm[a, c] t[a, :]: m multiply-adds per element, 8-lane FMAs along p. The same R as the XLA einsum, summed in another
// order: f32 rounding apart.
template <int NV, int CB>
AVX2 void MixRows(const float* t, const float* hm, int64_t m, int64_t p, int64_t c0, int64_t c1, float norm,
                  float* y) {
  // CB output rows at once: CB * NV independent FMA chains (the FMA's latency, not its
  // throughput, would bound one chain), each t vector loaded once for them.
  for (int64_t c = c0; c + CB <= c1; c += CB) {
    for (int64_t j0 = 0; j0 < p; j0 += 8 * NV) {
      __m256 acc[CB][NV];
      UNROLL for (int b = 0; b < CB; ++b) UNROLL for (int v = 0; v < NV; ++v) acc[b][v] = _mm256_setzero_ps();
      for (int64_t a = 0; a < m; ++a) {
        __m256 ta[NV];
        UNROLL for (int v = 0; v < NV; ++v) ta[v] = _mm256_loadu_ps(t + a * p + j0 + 8 * v);
        UNROLL for (int b = 0; b < CB; ++b) {
          const __m256 h = _mm256_set1_ps(hm[a * m + c + b]);
          UNROLL for (int v = 0; v < NV; ++v) acc[b][v] = _mm256_fmadd_ps(h, ta[v], acc[b][v]);
        }
      }
      const __m256 n = _mm256_set1_ps(norm);
      UNROLL for (int b = 0; b < CB; ++b) UNROLL for (int v = 0; v < NV; ++v) {
        _mm256_storeu_ps(y + (c + b) * p + j0 + 8 * v, _mm256_mul_ps(acc[b][v], n));
      }
    }
  }
}

// y = (hm^T t) * norm for p a multiple of 8: blocks of CB output rows, the last m % CB one by one.
template <int NV, int CB>
AVX2 void Mix(const float* t, const float* hm, int64_t m, int64_t p, float norm, float* y) {
  const int64_t whole = m - m % CB;
  MixRows<NV, CB>(t, hm, m, p, 0, whole, norm, y);
  MixRows<NV, 1>(t, hm, m, p, whole, m, norm, y);
}

// H_p (unscaled) on each of the m rows of t (m, p), p a multiple of 8, with t = x * inv *
// signs computed on the way in: the butterflies of h = 1, 2, 4 inside one 8-lane register
// (a lane swap, then u + v in the lower lanes and u - v, computed as swapped - v, in the
// upper: the same sums as the scalar loop, in the same order), h >= 8 across registers.
// Row a of t is at t + a * ld (ld = p; 2 p where two x rows are interleaved, MixRows512).
AVX2 void ButterfliesBy8(const float* x, const float* inv, const float* signs, int64_t m, int64_t p, float* t,
                         int64_t ld) {
  for (int64_t j = 0; j < m * p; j += 8) {
    __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(inv + j)),
                             _mm256_loadu_ps(signs + j));
    __m256 s = _mm256_permute_ps(v, 0xB1);  // h = 1: lanes [1, 0, 3, 2, ...]
    v = _mm256_blend_ps(_mm256_add_ps(v, s), _mm256_sub_ps(s, v), 0xAA);
    s = _mm256_permute_ps(v, 0x4E);  // h = 2: lanes [2, 3, 0, 1, ...]
    v = _mm256_blend_ps(_mm256_add_ps(v, s), _mm256_sub_ps(s, v), 0xCC);
    s = _mm256_permute2f128_ps(v, v, 0x01);  // h = 4: the two 128-bit halves swapped
    v = _mm256_blend_ps(_mm256_add_ps(v, s), _mm256_sub_ps(s, v), 0xF0);
    _mm256_storeu_ps(t + j / p * ld + j % p, v);
  }
  for (int64_t h = 8; h < p; h *= 2) {
    for (int64_t a = 0; a < m; ++a) {
      float* r = t + a * ld;
      for (int64_t i = 0; i < p; i += 2 * h) {
        for (int64_t j = i; j < i + h; j += 8) {
          const __m256 u = _mm256_loadu_ps(r + j), v = _mm256_loadu_ps(r + j + h);
          _mm256_storeu_ps(r + j, _mm256_add_ps(u, v));
          _mm256_storeu_ps(r + j + h, _mm256_sub_ps(u, v));
        }
      }
    }
  }
}

// MixRows in 16 lanes (AVX-512 CPUs: half the instructions), over rows of w floats: w = p,
// or 2 p = 16 where two x rows' t are interleaved (row a: [row 0's p | row 1's p]).
template <int NV, int CB>
VNNI void MixRows512(const float* t, const float* hm, int64_t m, int64_t w, int64_t c0, int64_t c1, float norm,
                     float* y) {
  for (int64_t c = c0; c + CB <= c1; c += CB) {
    for (int64_t j0 = 0; j0 < w; j0 += 16 * NV) {
      __m512 acc[CB][NV];
      UNROLL for (int b = 0; b < CB; ++b) UNROLL for (int v = 0; v < NV; ++v) acc[b][v] = _mm512_setzero_ps();
      for (int64_t a = 0; a < m; ++a) {
        __m512 ta[NV];
        UNROLL for (int v = 0; v < NV; ++v) ta[v] = _mm512_loadu_ps(t + a * w + j0 + 16 * v);
        UNROLL for (int b = 0; b < CB; ++b) {
          const __m512 h = _mm512_set1_ps(hm[a * m + c + b]);
          UNROLL for (int v = 0; v < NV; ++v) acc[b][v] = _mm512_fmadd_ps(h, ta[v], acc[b][v]);
        }
      }
      const __m512 n = _mm512_set1_ps(norm);
      UNROLL for (int b = 0; b < CB; ++b) UNROLL for (int v = 0; v < NV; ++v) {
        _mm512_storeu_ps(y + (c + b) * w + j0 + 16 * v, _mm512_mul_ps(acc[b][v], n));
      }
    }
  }
}

template <int NV, int CB>
VNNI void Mix512(const float* t, const float* hm, int64_t m, int64_t w, float norm, float* y) {
  const int64_t whole = m - m % CB;
  MixRows512<NV, CB>(t, hm, m, w, 0, whole, norm, y);
  MixRows512<NV, 1>(t, hm, m, w, whole, m, norm, y);
}

// Rows r0 and r0 + 1 of x rotated together (p = 8, AVX-512): their t interleaved into rows
// of 16, mixed in 16 lanes, split back into y (2, K). The same sums as RotateRow's.
VNNI void RotateTwoRows8(const float* x, const float* inv, const float* signs, const float* hm, int64_t m,
                         float* t, float* t2, float* y) {
  const int64_t K = m * 8;
  ButterfliesBy8(x, inv, signs, m, 8, t, 16);
  ButterfliesBy8(x + K, inv, signs, m, 8, t + 8, 16);
  Mix512<1, 8>(t, hm, m, 16, 1.0f / std::sqrt(8.0f), t2);
  for (int64_t c = 0; c < m; ++c) {
    _mm256_storeu_ps(y + c * 8, _mm256_loadu_ps(t2 + c * 16));
    _mm256_storeu_ps(y + K + c * 8, _mm256_loadu_ps(t2 + c * 16 + 8));
  }
}

AVX2 void RotateRow(const float* x, const float* inv, const float* signs, const float* hm, int64_t m, int64_t p,
                    float* t, float* y) {
  const int64_t K = m * p;
  const float norm = 1.0f / std::sqrt(static_cast<float>(p));
  if (p % 8 == 0) {
    ButterfliesBy8(x, inv, signs, m, p, t, p);
    if (kHasVnni && p >= 16) {
      if (p >= 128) return Mix512<8, 1>(t, hm, m, p, norm, y);
      if (p == 64) return Mix512<4, 2>(t, hm, m, p, norm, y);
      if (p == 32) return Mix512<2, 4>(t, hm, m, p, norm, y);
      return Mix512<1, 8>(t, hm, m, p, norm, y);
    }
    if (p >= 64) return Mix<8, 1>(t, hm, m, p, norm, y);
    if (p == 32) return Mix<4, 2>(t, hm, m, p, norm, y);
    if (p == 16) return Mix<2, 4>(t, hm, m, p, norm, y);
    return Mix<1, 8>(t, hm, m, p, norm, y);
  }
  for (int64_t k = 0; k < K; ++k) t[k] = x[k] * inv[k] * signs[k];
  for (int64_t h = 1; h < p; h *= 2) {
    for (int64_t a = 0; a < m; ++a) {
      float* r = t + a * p;
      for (int64_t i = 0; i < p; i += 2 * h) {
        for (int64_t j = i; j < i + h; ++j) {
          const float u = r[j], v = r[j + h];
          r[j] = u + v;
          r[j + h] = u - v;
        }
      }
    }
  }
  for (int64_t c = 0; c < m; ++c) {  // p < 8: a short row (K < 8 m)
    float* yc = y + c * p;
    for (int64_t j = 0; j < p; ++j) yc[j] = 0.0f;
    for (int64_t a = 0; a < m; ++a) {
      const float h = hm[a * m + c];
      for (int64_t j = 0; j < p; ++j) yc[j] += h * t[a * p + j];
    }
    for (int64_t j = 0; j < p; ++j) yc[j] *= norm;
  }
}

// x (M, K), inv (K,), either signs (0,) and hm (0, 0) -- no rotation -- or signs (K,) and
// hm (m, m) with m dividing K (rotated rows: RotateRow, then the pass on them), and scale
// (0,) -- dynamic -- or (1,), the static scale.
ffi::Error QuantizeRowsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x_buf, ffi::Buffer<ffi::F32> inv_buf,
                            ffi::Buffer<ffi::F32> signs_buf, ffi::Buffer<ffi::F32> hm_buf,
                            ffi::Buffer<ffi::F32> scale_buf, ffi::ResultBuffer<ffi::S8> xq_buf,
                            ffi::ResultBuffer<ffi::F32> sx_buf) {
  auto xd = x_buf.dimensions(), id = inv_buf.dimensions(), hd = hm_buf.dimensions();
  if (xd.size() != 2 || id.size() != 1 || id[0] != xd[1]) {
    return ffi::Error::InvalidArgument("actquant quantize_rows: expected x (M, K) and inv_smooth (K,)");
  }
  const int64_t M = xd[0], K = xd[1];
  const bool rotate = signs_buf.element_count() != 0;
  const int64_t m = rotate && hd.size() == 2 ? hd[0] : 0;
  if (rotate && (signs_buf.element_count() != static_cast<size_t>(K) || hd.size() != 2 || hd[1] != m || m < 1 ||
                 K % m != 0)) {
    return ffi::Error::InvalidArgument("actquant quantize_rows: expected signs (K,) and hm (m, m), m dividing K");
  }
  if (scale_buf.element_count() > 1) {
    return ffi::Error::InvalidArgument("actquant quantize_rows: expected scale (0,) or (1,)");
  }
  const float* scale = scale_buf.element_count() == 1 ? scale_buf.typed_data() : nullptr;
  // Row blocks of about 64 KiB of x: enough work per chunk, and both cores busy at M >= 2 * rows
  // (a rotated row is about m / 8 times the work: blocks that much shorter; an even count
  // where rows are rotated in pairs, RotateTwoRows8).
  const bool pairs = kHasVnni && rotate && K / m == 8;
  const int64_t rows0 = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(K, 1) /
                                                 std::max<int64_t>(1, m / 8));
  const int64_t rows = pairs ? rows0 + rows0 % 2 : rows0;
  const int64_t blocks = (M + rows - 1) / rows;
  const float* x = x_buf.typed_data();
  const float* inv = inv_buf.typed_data();
  int8_t* xq = xq_buf->typed_data();
  float* sx = sx_buf->typed_data();
  const auto pass = [scale](const float* xs, const float* invs, int64_t K, int64_t m0, int64_t m1, int8_t* q,
                            float* s) {
    if (kHasVnni) {
      QuantizeRows(xs, invs, K, m0, m1, q, s, scale);
    } else {
      QuantizeRowsAvx2(xs, invs, K, m0, m1, q, s, scale);
    }
  };
  if (blocks > 0) {
    ParallelFor(pool, blocks, [&](int64_t c) {
      const int64_t m0 = c * rows, m1 = std::min(M, m0 + rows);
      if (!rotate) return pass(x, inv, K, m0, m1, xq, sx);
      thread_local std::vector<float> t, t2, y, ones;
      t.resize(2 * K);
      t2.resize(2 * K);
      y.resize(2 * K);
      ones.assign(K, 1.0f);  // (the rotated row carries inv already)
      const float* signs = signs_buf.typed_data();
      const float* hm = hm_buf.typed_data();
      int64_t r = m0;
      if (pairs) {  // p = 8: two rows fill the 16 lanes
        for (; r + 2 <= m1; r += 2) {
          RotateTwoRows8(x + r * K, inv, signs, hm, m, t.data(), t2.data(), y.data());
          pass(y.data(), ones.data(), K, 0, 2, xq + r * K, sx + r);
        }
      }
      for (; r < m1; ++r) {
        RotateRow(x + r * K, inv, signs, hm, m, K / m, t.data(), y.data());
        pass(y.data(), ones.data(), K, 0, 1, xq + r * K, sx + r);
      }
    });
  }
  return ffi::Error::Success();
}


// ---- Decode attention over the KV cache: one query token per sequence, the cache read
// once (int8 with a scale per key/value vector, or f32), in any CPU's vector width.
//
//   q (B, KV, G, D) f32 (RoPE applied), every layer's keys K-major kt (L, B, KV, D, S), values
//   v (L, B, KV, S, D), k_scale / v_scale (L, B, KV, S) f32 (int8; empty for f32), pos (B,)
//   int32 (the query's position: keys 0..pos are seen), window () int32 (keys > pos - window
//   too; <= 0: none), layer () int32 (the layer read, in place), attrs scale, softcap (0:
//   none) -> out (B, KV, G, D) f32, the normalized context.
//
// Work units are (b, kv, chunk of kKeyChunk keys) through ParallelFor: a unit reads only
// the keys its sequence sees (never the unwritten end of the buffer), computes its scores
// (for each d, a row of kt against q[g][d]: vertical FMAs, no horizontal sums), their
// softmax part (row max, exp, sum) and the context of its values (for each key, a row of
// v scaled by p[g][s] * v_scale[s]); the parts of a (b, kv) are merged by log-sum-exp.
// The q.k and p.v contractions run as AVX2+FMA register blocks where the CPU has them
// (else, and for the remainders, plain loops compiled for AVX2 and the baseline).

constexpr int64_t kKeyChunk = 256;

// exp(x) for x <= 0 (a softmax's shifted scores): Cephes' expf polynomial on x = n ln2 + r,
// |r| <= ln2 / 2, times 2^n from the exponent bits; relative error ~2e-7, 0 below -87.
// Branch-free, so the loops calling it vectorize (libm's expf is a call per element).
__attribute__((always_inline)) inline float ExpNonPositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x <= -87.0f ? 0.0f : p * scale;
}

template <typename T>
__attribute__((always_inline)) inline void Widen(const T* __restrict__ src, float* __restrict__ dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

__attribute__((always_inline)) inline void Axpy(float a, const float* __restrict__ x, float* __restrict__ y, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] += a * x[j];
}

// AVX2+FMA register blocks (on CPUs that have them): scores for 16 keys x up to 4 query
// heads at a time, and the context for 32 channels x up to 3 heads, accumulated in
// registers over the whole contraction. The plain loops below stored every partial sum
// (a widened row, then an axpy per head): 1.5 GMAC/s on a 2-core EPYC, load/store bound.
__attribute__((target("avx2,fma"))) inline __m256 Load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
__attribute__((target("avx2,fma"))) inline __m256 Load8(const float* p) { return _mm256_loadu_ps(p); }

// p[g][j] = sum_d q[g][d] * kt[d][s0 + j] for heads g0..g0+GB, keys j < n16 (a multiple of 16)
template <typename T, int GB>
__attribute__((target("avx2,fma"))) void ScoresAvx2(const float* q, const T* kt, int64_t S, int64_t D, int64_t s0,
                                                    int64_t n, int64_t n16, int64_t g0, float* p) {
  for (int64_t j = 0; j < n16; j += 16) {
    __m256 acc[GB][2];
    for (int g = 0; g < GB; ++g) acc[g][0] = acc[g][1] = _mm256_setzero_ps();
    const T* col = kt + s0 + j;
    for (int64_t d = 0; d < D; ++d) {
      const __m256 a = Load8(col + d * S), b = Load8(col + d * S + 8);
      for (int g = 0; g < GB; ++g) {
        const __m256 qv = _mm256_broadcast_ss(q + (g0 + g) * D + d);
        acc[g][0] = _mm256_fmadd_ps(qv, a, acc[g][0]);
        acc[g][1] = _mm256_fmadd_ps(qv, b, acc[g][1]);
      }
    }
    for (int g = 0; g < GB; ++g) {
      _mm256_storeu_ps(p + (g0 + g) * n + j, acc[g][0]);
      _mm256_storeu_ps(p + (g0 + g) * n + j + 8, acc[g][1]);
    }
  }
}

// ctx[g][d] += sum_j p[g][j] * v[s0 + j][d] for heads g0..g0+GB, channels d < D32 (a multiple of 32)
template <typename T, int GB>
__attribute__((target("avx2,fma"))) void ContextAvx2(const float* p, const T* v, int64_t D, int64_t s0, int64_t n,
                                                     int64_t D32, int64_t g0, float* ctx) {
  for (int64_t d = 0; d < D32; d += 32) {
    __m256 acc[GB][4];
    for (int g = 0; g < GB; ++g)
      for (int i = 0; i < 4; ++i) acc[g][i] = _mm256_loadu_ps(ctx + (g0 + g) * D + d + 8 * i);
    for (int64_t j = 0; j < n; ++j) {
      const T* row = v + (s0 + j) * D + d;
      const __m256 r0 = Load8(row), r1 = Load8(row + 8), r2 = Load8(row + 16), r3 = Load8(row + 24);
      for (int g = 0; g < GB; ++g) {
        const __m256 pv = _mm256_broadcast_ss(p + (g0 + g) * n + j);
        acc[g][0] = _mm256_fmadd_ps(pv, r0, acc[g][0]);
        acc[g][1] = _mm256_fmadd_ps(pv, r1, acc[g][1]);
        acc[g][2] = _mm256_fmadd_ps(pv, r2, acc[g][2]);
        acc[g][3] = _mm256_fmadd_ps(pv, r3, acc[g][3]);
      }
    }
    for (int g = 0; g < GB; ++g)
      for (int i = 0; i < 4; ++i) _mm256_storeu_ps(ctx + (g0 + g) * D + d + 8 * i, acc[g][i]);
  }
}

// pg[j] = exp(pg[j] - m) (ExpNonPositive's formula, 8 lanes at a time) -> their sum.
// GCC left the scalar loop unvectorized (the int bit-cast of 2^n).
__attribute__((target("avx2,fma"))) float ExpShiftSumAvx2(float* pg, int64_t n, float m) {
  const __m256 mv = _mm256_set1_ps(m), lo = _mm256_set1_ps(-87.0f), zero = _mm256_setzero_ps();
  __m256 sum = zero;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 x = _mm256_max_ps(_mm256_sub_ps(_mm256_loadu_ps(pg + j), mv), lo);
    const __m256 nf = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fmadd_ps(nf, _mm256_set1_ps(2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
    const __m256i e2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(nf), _mm256_set1_epi32(127)), 23);
    __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(e2));
    e = _mm256_blendv_ps(e, zero, _mm256_cmp_ps(x, lo, _CMP_LE_OQ));
    _mm256_storeu_ps(pg + j, e);
    sum = _mm256_add_ps(sum, e);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, sum);
  float l = 0.0f;
  for (int i = 0; i < 8; ++i) l += lanes[i];
  for (; j < n; ++j) {
    const float e = ExpNonPositive(pg[j] - m);
    l += e;
    pg[j] = e;
  }
  return l;
}

template <typename T>
__attribute__((target("avx2,fma"))) void BlocksAvx2(const float* q, const T* kt, const T* v, int64_t S, int64_t D,
                                                    int64_t G, int64_t s0, int64_t n, bool scores, float* p,
                                                    float* ctx, int64_t* done) {
  if (scores) {
    const int64_t n16 = n / 16 * 16;
    // The chunk's keys copied to a tile first: rows S apart (a power of two, often) all
    // fall in one L1 set, and a 16-key block reads one row per channel (measured: 2.1x).
    const int64_t stride = n16 + 64 / sizeof(T);  // padded: the tile's rows spread over the sets
    thread_local std::vector<T> tile;
    tile.resize(D * stride);
    for (int64_t d = 0; d < D; ++d) std::memcpy(tile.data() + d * stride, kt + d * S + s0, n16 * sizeof(T));
    for (int64_t g0 = 0; g0 < G; g0 += 4) {
      switch (std::min<int64_t>(4, G - g0)) {
        case 4: ScoresAvx2<T, 4>(q, tile.data(), stride, D, 0, n, n16, g0, p); break;
        case 3: ScoresAvx2<T, 3>(q, tile.data(), stride, D, 0, n, n16, g0, p); break;
        case 2: ScoresAvx2<T, 2>(q, tile.data(), stride, D, 0, n, n16, g0, p); break;
        default: ScoresAvx2<T, 1>(q, tile.data(), stride, D, 0, n, n16, g0, p);
      }
    }
    *done = n16;
  } else {
    const int64_t d32 = D / 32 * 32;
    for (int64_t g0 = 0; g0 < G; g0 += 3) {
      switch (std::min<int64_t>(3, G - g0)) {
        case 3: ContextAvx2<T, 3>(p, v, D, s0, n, d32, g0, ctx); break;
        case 2: ContextAvx2<T, 2>(p, v, D, s0, n, d32, g0, ctx); break;
        default: ContextAvx2<T, 1>(p, v, D, s0, n, d32, g0, ctx);
      }
    }
    *done = d32;
  }
}

// ACTQUANT_CPU_BASELINE=1 (tests): the baseline loops on any CPU.
const bool kHasAvx2Fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         std::getenv("ACTQUANT_CPU_BASELINE") == nullptr;

template <typename T>
__attribute__((always_inline)) inline void AttendKeysBody(const float* q, const T* kt, const float* ks, const T* v, const float* vs, int64_t S, int64_t D,
                int64_t G, int64_t s0, int64_t n, float scale, float softcap, float* m_out, float* l_out,
                float* ctx, float* p) {  // p: G * n scores, then max(n, D) scratch
  float* wide = p + G * n;  // a row widened to f32 once, then used by every query head
  int64_t j0 = 0;           // keys [0, j0) scored by the register blocks
  if (kHasAvx2Fma) BlocksAvx2(q, kt, v, S, D, G, s0, n, true, p, ctx, &j0);
  for (int64_t g = 0; g < G; ++g) std::fill(p + g * n + j0, p + (g + 1) * n, 0.0f);
  if (j0 < n) {
    for (int64_t d = 0; d < D; ++d) {
      Widen(kt + d * S + s0 + j0, wide, n - j0);
      for (int64_t g = 0; g < G; ++g) Axpy(q[g * D + d], wide, p + g * n + j0, n - j0);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* __restrict__ pg = p + g * n;
    if (ks) {
      const float* __restrict__ kss = ks + s0;
      for (int64_t j = 0; j < n; ++j) pg[j] *= scale * kss[j];
    } else {
      for (int64_t j = 0; j < n; ++j) pg[j] *= scale;
    }
    if (softcap > 0.0f) {
      for (int64_t j = 0; j < n; ++j) pg[j] = std::tanh(pg[j] / softcap) * softcap;
    }
    float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < n; ++j) m = std::max(m, pg[j]);
    float l = 0.0f;
    if (kHasAvx2Fma) {
      l = ExpShiftSumAvx2(pg, n, m);
    } else {
#pragma omp simd reduction(+ : l)
      for (int64_t j = 0; j < n; ++j) {
        const float e = ExpNonPositive(pg[j] - m);
        l += e;
        pg[j] = e;
      }
    }
    if (vs) {
      const float* __restrict__ vss = vs + s0;
      for (int64_t j = 0; j < n; ++j) pg[j] *= vss[j];
    }
    m_out[g] = m;
    l_out[g] = l;
  }
  std::fill(ctx, ctx + G * D, 0.0f);
  int64_t d0 = 0;  // channels [0, d0) by the register blocks
  if (kHasAvx2Fma) BlocksAvx2(q, kt, v, S, D, G, s0, n, false, p, ctx, &d0);
  if (d0 < D) {
    for (int64_t j = 0; j < n; ++j) {
      Widen(v + (s0 + j) * D + d0, wide, D - d0);
      for (int64_t g = 0; g < G; ++g) Axpy(p[g * n + j], wide, ctx + g * D + d0, D - d0);
    }
  }
}

// The body compiled twice, for AVX2+FMA and for the baseline, picked by a CPUID check
// (target_clones' "arch=haswell" picked the baseline on AMD CPUs: scalar exp, 4x slower).
template <typename T>
__attribute__((target("avx2,fma"))) void AttendKeysAvx2(const float* q, const T* kt, const float* ks, const T* v,
                                                        const float* vs, int64_t S, int64_t D, int64_t G, int64_t s0,
                                                        int64_t n, float scale, float softcap, float* m_out,
                                                        float* l_out, float* ctx, float* p) {
  AttendKeysBody<T>(q, kt, ks, v, vs, S, D, G, s0, n, scale, softcap, m_out, l_out, ctx, p);
}

template <typename T>
void AttendKeys(const float* q, const T* kt, const float* ks, const T* v, const float* vs, int64_t S, int64_t D,
                int64_t G, int64_t s0, int64_t n, float scale, float softcap, float* m_out, float* l_out, float* ctx,
                float* p) {
  if (kHasAvx2Fma) {
    AttendKeysAvx2<T>(q, kt, ks, v, vs, S, D, G, s0, n, scale, softcap, m_out, l_out, ctx, p);
  } else {
    AttendKeysBody<T>(q, kt, ks, v, vs, S, D, G, s0, n, scale, softcap, m_out, l_out, ctx, p);
  }
}

template <ffi::DataType DT>
ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q_buf, ffi::Buffer<DT> kt_buf,
                               ffi::Buffer<ffi::F32> ks_buf, ffi::Buffer<DT> v_buf, ffi::Buffer<ffi::F32> vs_buf,
                               ffi::Buffer<ffi::S32> pos_buf, ffi::Buffer<ffi::S32> window_buf,
                               ffi::Buffer<ffi::S32> layer_buf, ffi::ResultBuffer<ffi::F32> out_buf, float scale,
                               float softcap) {
  using T = ffi::NativeType<DT>;
  auto qd = q_buf.dimensions(), kd = kt_buf.dimensions(), vd = v_buf.dimensions();
  if (qd.size() != 4 || kd.size() != 5 || vd.size() != 5 || kd[0] != vd[0] || kd[1] != qd[0] || kd[2] != qd[1] ||
      kd[3] != qd[3] || vd[1] != qd[0] || vd[2] != qd[1] || vd[3] != kd[4] || vd[4] != qd[3] ||
      pos_buf.element_count() != qd[0]) {
    return ffi::Error::InvalidArgument("actquant decode_attention: expected q (B, KV, G, D), kt (L, B, KV, D, S), "
                                       "v (L, B, KV, S, D), pos (B,)");
  }
  const int64_t L = kd[0], B = qd[0], KV = qd[1], G = qd[2], D = qd[3], S = kd[4];
  const int64_t layer = layer_buf.typed_data()[0];
  if (layer < 0 || layer >= L) return ffi::Error::InvalidArgument("actquant decode_attention: layer out of range");
  const bool scaled = ks_buf.element_count() > 0;
  if (scaled && (ks_buf.element_count() != L * B * KV * S || vs_buf.element_count() != L * B * KV * S)) {
    return ffi::Error::InvalidArgument("actquant decode_attention: k_scale / v_scale must be (L, B, KV, S)");
  }
  // this layer's cache: the stacked buffers are read in place (no copy of the layer's slice)
  const float* q = q_buf.typed_data();
  const T* kt = kt_buf.typed_data() + layer * B * KV * D * S;
  const T* v = v_buf.typed_data() + layer * B * KV * S * D;
  const float* ks = scaled ? ks_buf.typed_data() + layer * B * KV * S : nullptr;
  const float* vs = scaled ? vs_buf.typed_data() + layer * B * KV * S : nullptr;
  const int32_t* pos = pos_buf.typed_data();
  const int32_t window = window_buf.typed_data()[0];
  float* out = out_buf->typed_data();
  const int64_t chunks = (S + kKeyChunk - 1) / kKeyChunk, units = B * KV * chunks;
  // per unit: m (G), l (G), ctx (G * D)
  std::vector<float> parts(units * G * (D + 2));
  ParallelFor(pool, units, [&](int64_t u) {
    const int64_t b = u / (KV * chunks), h = (u / chunks) % KV, c = u % chunks;
    float* m = parts.data() + u * G * (D + 2);
    float* l = m + G;
    float* ctx = l + G;
    const int64_t last = std::min<int64_t>(pos[b], S - 1);
    const int64_t first = window > 0 ? std::max<int64_t>(0, pos[b] - window + 1) : 0;
    const int64_t s0 = std::max(c * kKeyChunk, first), s1 = std::min((c + 1) * kKeyChunk, last + 1);
    if (s1 <= s0) {
      for (int64_t g = 0; g < G; ++g) m[g] = -std::numeric_limits<float>::infinity(), l[g] = 0.0f;
      return;
    }
    thread_local std::vector<float> p;
    p.resize(G * kKeyChunk + std::max(kKeyChunk, D));  // scores, and one widened row
    const int64_t bh = b * KV + h;
    AttendKeys<T>(q + bh * G * D, kt + bh * D * S, ks ? ks + bh * S : nullptr, v + bh * S * D,
                  vs ? vs + bh * S : nullptr, S, D, G, s0, s1 - s0, scale, softcap, m, l, ctx, p.data());
  });
  for (int64_t bh = 0; bh < B * KV; ++bh) {
    for (int64_t g = 0; g < G; ++g) {
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < chunks; ++c) mx = std::max(mx, parts[(bh * chunks + c) * G * (D + 2) + g]);
      float den = 0.0f;
      float* o = out + (bh * G + g) * D;
      for (int64_t d = 0; d < D; ++d) o[d] = 0.0f;
      for (int64_t c = 0; c < chunks; ++c) {
        const float* part = parts.data() + (bh * chunks + c) * G * (D + 2);
        if (part[G + g] == 0.0f) continue;  // no key seen in this chunk
        const float w = std::exp(part[g] - mx);
        den += part[G + g] * w;
        const float* cg = part + 2 * G + g * D;
        for (int64_t d = 0; d < D; ++d) o[d] += cg[d] * w;
      }
      for (int64_t d = 0; d < D; ++d) o[d] /= den;
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ActquantMarkedRows, MarkedRowsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ActquantS8Gemm, S8GemmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ActquantQuantizeRows, QuantizeRowsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

#define ACTQUANT_DECODE_ATTENTION(NAME, DT)                                   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, DecodeAttentionImpl<DT>,                \
                                ffi::Ffi::Bind()                              \
                                    .Ctx<ffi::ThreadPool>()                   \
                                    .Arg<ffi::Buffer<ffi::F32>>()             \
                                    .Arg<ffi::Buffer<DT>>()                   \
                                    .Arg<ffi::Buffer<ffi::F32>>()             \
                                    .Arg<ffi::Buffer<DT>>()                   \
                                    .Arg<ffi::Buffer<ffi::F32>>()             \
                                    .Arg<ffi::Buffer<ffi::S32>>()             \
                                    .Arg<ffi::Buffer<ffi::S32>>()             \
                                    .Arg<ffi::Buffer<ffi::S32>>()             \
                                    .Ret<ffi::Buffer<ffi::F32>>()             \
                                    .Attr<float>("scale")                     \
                                    .Attr<float>("softcap"));

ACTQUANT_DECODE_ATTENTION(ActquantDecodeAttentionS8, ffi::S8)
ACTQUANT_DECODE_ATTENTION(ActquantDecodeAttentionF32, ffi::F32)
