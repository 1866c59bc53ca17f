// Private helpers shared by the CUDA forward and backward kernels of shadow attention (every
// family: shadow_attention_kernels.h). Not installed, not a public API.
//
// Besides the CuTe and wgmma families, two kernel families, chosen per call on the host
// (shadow_attention_fwd.cu, shadow_attention_bwd.cu):
//   * tensor-core kernels (WMMA 16x16x16, fp32 accumulators) for bfloat16/float16 with
//     head_dim 64 or 128 and 16-byte aligned rows; each warp owns 16 rows of a 64-row tile
//     (shadow_attention_wmma.cuh).
//   * SIMT kernels for everything else (float32, any head_dim 0..256, odd strides): one warp
//     owns 4 rows; lane j handles partner row j of a 32-row tile for scores, and head-dim
//     slice d = lane + 32 t for the accumulators. Blocks have 8 warps (32 own rows), except the
//     backward kernels above head_dim 192, which use 4 warps (16 own rows) to fit in 99 KB of
//     shared memory (SimtTraits::bwd_rows; shadow_attention_simt.cuh).
// All of them skip key tiles that the eviction log hides from the whole query tile, using a
// per-32-key min/max of evicted_at computed once per call (ev_minmax_kernel).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "device_math.cuh"
#include "device_workspace.cuh"
#include "smem_optin.cuh"

#include <climits>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "shadowkv/shadow_attention.h"

namespace shadowkv {
namespace cuda_attn {

using cuda_common::from_f32;
using cuda_common::kFullMask;
using cuda_common::to_f32;
using cuda_common::warp_max;
using cuda_common::warp_sum;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// The tile walk below (which key tiles a query tile sees, which queries a key tile needs) is
// host code too, so that tests/cpp/test_attention_tiles.cu checks it against brute force on a
// machine without a GPU; kernels call it as device code.
#define SHADOWKV_TILE_FN __host__ __device__ __forceinline__

// Granularity of the evicted_at min/max pre-pass; every kernel's key tile is a multiple of it.
constexpr int kEvTile = 32;
// evicted_at stand-in for key slots past kv_len: no position is < INT32_MIN, so they are masked.
constexpr int kEvOutOfRange = INT32_MIN;

// ------------------------------------------------------------------------------------------
// Shared memory.

// Byte offsets of the buffers in one kernel's dynamic shared memory; each buffer starts on a
// 128-byte boundary. Used identically on the host (size) and the device (pointers).
struct SmemCarver {
  size_t bytes = 0;
  template <typename U>
  __host__ __device__ size_t take(size_t count) {
    const size_t off = bytes;
    bytes += (count * sizeof(U) + 127) / 128 * 128;
    return off;
  }
};

__device__ __forceinline__ unsigned char* dynamic_smem() {
#if defined(SHADOWKV_CUDA_EMULATION) && !defined(__CUDA_ARCH__)
  return static_cast<unsigned char*>(shadowkv_emu::dynamic_shared_memory());
#else
  extern __shared__ __align__(128) unsigned char shadowkv_attn_smem[];
  return shadowkv_attn_smem;
#endif
}

// ------------------------------------------------------------------------------------------
// Host helpers.

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("shadow_attention CUDA error in ") + what + ": " +
                             cudaGetErrorString(err));
  }
}

inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

using cuda_common::DeviceWorkspace;

[[noreturn]] inline void bad_arg(const char* fn, const std::string& msg) {
  throw std::invalid_argument(std::string(fn) + ": " + msg);
}

// What the CUDA kernels add to check_shadow_attention_params (shadow_attention.h), which every
// entry point runs first; `fn` names the entry point in messages.
inline void check_cuda_support(const ShadowAttentionParams& p, const char* fn) {
  if (p.dtype == DType::kFloat64) {
    bad_arg(fn, "float64 is not supported by the CUDA kernels; expected float32, bfloat16 or "
                "float16 (use the CPU kernel for float64)");
  }
  if (p.head_dim > 256) bad_arg(fn, "head_dim must be in [0, 256], got " + std::to_string(p.head_dim));
}

inline int device_cc_major() {
  int dev = 0, major = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "cudaDeviceGetAttribute");
  return major;
}

// The tensor-core kernels copy rows with 16-byte vector loads.
inline bool rows_16b_aligned(const void* ptr, const int64_t (&stride)[3]) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && stride[0] % 8 == 0 && stride[1] % 8 == 0 &&
         stride[2] % 8 == 0;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline unsigned grid_1d(int64_t blocks, const char* kernel) {
  if (blocks > INT32_MAX) {
    throw std::invalid_argument(std::string("shadow_attention: problem too large for one launch of ") + kernel);
  }
  return static_cast<unsigned>(blocks);
}

// Opts `kernel` in to `bytes` of dynamic shared memory, or a clear error on a GPU with less.
template <typename Kernel>
void set_smem_limit(Kernel kernel, size_t bytes) {
  cuda_common::opt_in_smem(kernel, bytes, "shadowkv::shadow_attention", "the kernel for this head_dim",
                           "GPUs before sm_80 run the SIMT kernels, which stage float32 rows whatever the "
                           "dtype; use a smaller head_dim or a newer GPU");
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}, std::integral_constant<int, D>{}) for the 16-bit element type T of `dt`
// and head_dim D in {64, 128}: the instantiations of the CuTe and wgmma kernels. The callers
// check first; anything else is a logic_error naming `fn`.
template <typename F>
void dispatch_16bit_d64_d128(DType dt, int64_t head_dim, const char* fn, F&& f) {
  using D64 = std::integral_constant<int, 64>;
  using D128 = std::integral_constant<int, 128>;
  if (dt != DType::kBFloat16 && dt != DType::kFloat16) throw std::logic_error(std::string(fn) + ": 16-bit dtypes only");
  const bool bf16 = dt == DType::kBFloat16;
  if (head_dim == 64) return bf16 ? f(TypeTag<__nv_bfloat16>{}, D64{}) : f(TypeTag<__half>{}, D64{});
  if (head_dim == 128) return bf16 ? f(TypeTag<__nv_bfloat16>{}, D128{}) : f(TypeTag<__half>{}, D128{});
  throw std::logic_error(std::string(fn) + ": head_dim must be 64 or 128");
}

// Calls f(TypeTag<T>{}) with the CUDA element type of `dt` (float64 was rejected earlier).
template <typename F>
void dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: f(TypeTag<float>{}); return;
    case DType::kBFloat16: f(TypeTag<__nv_bfloat16>{}); return;
    case DType::kFloat16: f(TypeTag<__half>{}); return;
    default: throw std::invalid_argument("shadow_attention CUDA: unsupported dtype");
  }
}

// ------------------------------------------------------------------------------------------
// Device helpers.


// The shadow mask (DESIGN.md section 1).
SHADOWKV_TILE_FN bool visible(int64_t key, int64_t pos, int ev) { return key <= pos && pos < ev; }
// The same for key k0 + col0 + off, a column `off` past a thread's first score column col0 (a
// compile-time offset in the CuTe kernels), given last = pos - k0 - col0: no 64-bit key per column.
SHADOWKV_TILE_FN bool visible_at_offset(int off, int64_t last, int64_t pos, int ev) { return off <= last && pos < ev; }

// min (x) and max (y) of evicted_at over keys [k0, k0 + width) of one (batch, kv head);
// `mm` holds that head's per-kEvTile results, k0 and width are multiples of kEvTile.
SHADOWKV_TILE_FN int2 key_tile_ev_range(const int2* __restrict__ mm, int64_t n_ev_tiles, int64_t k0,
                                                  int width) {
  int lo = INT_MAX, hi = INT_MIN;
  const int64_t t0 = k0 / kEvTile;
  for (int t = 0; t < width / kEvTile && t0 + t < n_ev_tiles; ++t) {
    const int2 v = mm[t0 + t];
    lo = min(lo, v.x);
    hi = max(hi, v.y);
  }
  return make_int2(lo, hi);
}

// What every backward kernel gets, once bwd_rows_kernel (shadow_attention_bwd.cu) wrote the
// per-row statistics: the parameters, the log's per-tile (min, max) of ev_minmax_kernel (n_ev
// tiles per (batch, kv head)), lse2 = lse * log2(e), delta = rowsum(dO * O) - grad_lse, the
// softmax scale times log2(e), and the stream (ignored by the host emulation).
struct BwdLaunch {
  const ShadowAttentionBwdParams& bp;
  const int2* mm;
  int64_t n_ev;
  const float* lse2;
  const float* delta;
  float scale_log2;
  cudaStream_t stream;
};

// Block -> (batch, query head, query tile) of the forward and dQ kernels. Tiles of one head run
// latest-first: under a causal mask they are the longest, so the grid tail is made of short blocks.
struct QueryTile {
  int64_t b, hq, hkv, i0;
  int rows;        // valid rows of the tile
  int64_t p0, p1;  // absolute positions of its first and last valid row
};

SHADOWKV_TILE_FN QueryTile query_tile_of(const ShadowAttentionParams& p, int tile_rows, int64_t bid) {
  const int64_t n_tiles = (p.q_len + tile_rows - 1) / tile_rows;
  QueryTile t;
  const int64_t bh = bid / n_tiles;
  t.hq = bh % p.num_q_heads;
  t.b = bh / p.num_q_heads;
  t.hkv = t.hq / (p.num_q_heads / p.num_kv_heads);
  t.i0 = (n_tiles - 1 - bid % n_tiles) * tile_rows;
  t.rows = static_cast<int>(min(static_cast<int64_t>(tile_rows), p.q_len - t.i0));
  t.p0 = p.q_offset + t.i0;
  t.p1 = t.p0 + t.rows - 1;
  return t;
}
__device__ __forceinline__ QueryTile query_tile(const ShadowAttentionParams& p, int tile_rows) {
  return query_tile_of(p, tile_rows, blockIdx.x);
}

// Block -> (batch, kv head, key tile) for dK/dV; first key tiles first (seen by the most queries).
// [i_begin, i_end) bounds the query rows that can see any key of the tile: no row before the
// first key, none at or after the largest evicted_at.
struct KeyTile {
  int64_t b, hkv, k0;
  int rows;
  int2 ev;  // min / max evicted_at over the tile (over its enclosing kEvTile keys if shorter)
  int64_t i_begin, i_end;
};

SHADOWKV_TILE_FN KeyTile key_tile_of(const ShadowAttentionParams& p, int tile_rows, const int2* ev_mm,
                                     int64_t n_ev_tiles, int64_t bid) {
  const int64_t n_tiles = (p.kv_len + tile_rows - 1) / tile_rows;
  KeyTile t;
  const int64_t bh = bid / n_tiles;
  t.hkv = bh % p.num_kv_heads;
  t.b = bh / p.num_kv_heads;
  t.k0 = bid % n_tiles * tile_rows;
  t.rows = static_cast<int>(min(static_cast<int64_t>(tile_rows), p.kv_len - t.k0));
  // The min/max pre-pass has kEvTile granularity: a tile of fewer rows (the SIMT kernel's 16 rows
  // above head_dim 192) takes the range of its enclosing kEvTile keys, a superset, which can only
  // make it look less fully visible and widen [i_begin, i_end); the per-pair mask stays exact.
  const int64_t ev_k0 = tile_rows < kEvTile ? t.k0 / kEvTile * kEvTile : t.k0;
  t.ev = key_tile_ev_range(ev_mm + (t.b * p.num_kv_heads + t.hkv) * n_ev_tiles, n_ev_tiles, ev_k0,
                           max(tile_rows, kEvTile));
  t.i_begin = max(static_cast<int64_t>(0), t.k0 - p.q_offset);
  t.i_end = min(p.q_len, static_cast<int64_t>(t.ev.y) - p.q_offset);
  return t;
}
__device__ __forceinline__ KeyTile key_tile(const ShadowAttentionParams& p, int tile_rows, const int2* ev_mm,
                                            int64_t n_ev_tiles) {
  return key_tile_of(p, tile_rows, ev_mm, n_ev_tiles, blockIdx.x);
}

// Query tile [p0, p1] (rows complete) against key tile [k0, k0 + width): every pair visible?
SHADOWKV_TILE_FN bool pairs_all_visible(const KeyTile& kt, int width, int64_t kv_len, int64_t p0,
                                                  int64_t p1, bool rows_complete) {
  return rows_complete && kt.k0 + width <= kv_len && kt.k0 + width - 1 <= p0 && kt.ev.x > p1;
}

// Query rows [i0, i0 + rows) of one head as a dK/dV kernel streams them, `tile` rows at a time,
// against key tile kt of `key_rows` keys: how many exist, the absolute position of the first,
// and whether every (query, key) pair of the two tiles is visible (no per-element mask needed).
struct QueryRows {
  int rows;
  int64_t p0;
  bool full;
};

SHADOWKV_TILE_FN QueryRows query_rows(const ShadowAttentionParams& p, const KeyTile& kt, int key_rows,
                                                int64_t i0, int tile) {
  const int rows = static_cast<int>(min(static_cast<int64_t>(tile), p.q_len - i0));
  const int64_t p0 = p.q_offset + i0;
  return {rows, p0, pairs_all_visible(kt, key_rows, p.kv_len, p0, p0 + rows - 1, rows == tile)};
}

enum class TileKind { kSkip, kPartial, kFull };

// Key tile [k0, k0 + width) against query positions [p0, p1]. Skip: no key is visible to any of
// these queries (all keys are in the future, or evicted before the first query). Full: every key
// exists and is visible to every query, so the per-element mask can be left out.
SHADOWKV_TILE_FN TileKind classify_key_tile(int2 ev, int64_t k0, int width, int64_t kv_len, int64_t p0,
                                                      int64_t p1) {
  if (k0 > p1 || ev.y <= p0) return TileKind::kSkip;
  if (k0 + width <= kv_len && k0 + width - 1 <= p0 && ev.x > p1) return TileKind::kFull;
  return TileKind::kPartial;
}

// evicted_at[j] of one (batch, kv head) row: through the read-only cache on the device.
SHADOWKV_TILE_FN int ev_at(const int32_t* evg, int64_t j) {
#ifdef __CUDA_ARCH__
  return __ldg(evg + j);
#else
  return evg[j];
#endif
}

// Whether some query position in [p0, p1] sees key j (log entry `ev`): the first one that
// could, max(j, p0), is inside the range and before the key's eviction.
SHADOWKV_TILE_FN bool seen_by_some(int64_t j, int64_t p0, int64_t p1, int ev) {
  const int64_t first = j > p0 ? j : p0;
  return first <= p1 && first < ev;
}

// K/V rows that no query a block handles can see are staged as zeros, whatever the slot holds
// (padding, a slot a server reused): their P is 0, but the MMAs would still give 0 * NaN = NaN
// in P V (forward), dS K (dQ) and, through dP = dO V^T, dS = P (dP - delta) (dK). Known
// limitation: a key seen by some rows of a tile keeps its values, so if they are not finite,
// the tile's rows that do not see it get NaN from it too. Finite values are exact. In the
// one-pass backward (shadow_attention_wgmma_fused.cuh) dQ = dS K reads the dK/dV block's own
// K tile, which keeps every key some query of the block's whole range sees: there a
// non-finite key reaches the dQ rows of every query tile the block visits.

// Whether K/V row `row` of key tile k0 is loaded by the forward or dQ block of query tile t: a
// key past kv_len never is; in a partial tile only keys that some valid row of t sees are.
SHADOWKV_TILE_FN bool kv_row_needed(int row, int64_t k0, const ShadowAttentionParams& p, const QueryTile& t,
                                    TileKind kind, const int32_t* evg) {
  const int64_t j = k0 + row;
  if (j >= p.kv_len) return false;
  return kind != TileKind::kPartial || seen_by_some(j, t.p0, t.p1, ev_at(evg, j));
}

// kv_row_needed for a partial tile whose log entries are staged in shared memory (sev[row], the
// entry of key k0 + row; not read past kv_len).
SHADOWKV_TILE_FN bool staged_kv_row_needed(int row, int64_t k0, const ShadowAttentionParams& p, const QueryTile& t,
                                           const int* sev) {
  const int64_t j = k0 + row;
  return j < p.kv_len && seen_by_some(j, t.p0, t.p1, sev[row]);
}

// Whether own K/V row `row` of dK/dV block kt is loaded: the key exists and some query the
// block visits ([i_begin, i_end), which holds every query that sees a key of the tile) sees it.
SHADOWKV_TILE_FN bool own_kv_row_needed(int row, const ShadowAttentionParams& p, const KeyTile& kt,
                                        const int32_t* evg) {
  const int64_t j = kt.k0 + row;
  return row < kt.rows &&
         seen_by_some(j, p.q_offset + kt.i_begin, p.q_offset + kt.i_end - 1, ev_at(evg, j));
}

// A dK/dV block's steps: every (query head of the GQA group, query tile of `tile` rows in
// [i_begin, i_end)), heads outer, so that a prefetch crosses from one head to the next.
struct HeadQuerySteps {
  struct Step {
    int64_t hq, i0;
  };
  int64_t hq_begin, hq_end, i_begin, i_end;
  int tile;
  // No steps at all when no query can see the block's keys (i_begin >= i_end).
  SHADOWKV_TILE_FN HeadQuerySteps(const ShadowAttentionParams& p, const KeyTile& kt, int tile_rows)
      : hq_begin(kt.hkv * (p.num_q_heads / p.num_kv_heads)),
        hq_end(kt.i_begin < kt.i_end ? hq_begin + p.num_q_heads / p.num_kv_heads : hq_begin),
        i_begin(kt.i_begin),
        i_end(kt.i_end),
        tile(tile_rows) {}
  SHADOWKV_TILE_FN Step first() const { return Step{hq_begin, i_begin}; }
  SHADOWKV_TILE_FN bool done(Step st) const { return st.hq >= hq_end; }
  SHADOWKV_TILE_FN Step after(Step st) const {
    st.i0 += tile;
    if (st.i0 >= i_end) st = Step{st.hq + 1, i_begin};
    return st;
  }
};

// The threads that classify key tiles together (key_tile_kind): this thread's index among them,
// how many they are, and their barrier. The whole block by default; the producer warpgroup of
// the warp-specialised forward (shadow_attention_fwd_ws.cuh) passes its own.
struct BlockGroup {
  __device__ int rank() const { return threadIdx.x; }
  __device__ int size() const { return blockDim.x; }
  __device__ void sync() const { __syncthreads(); }
};

// Key tiles [0, n_tiles) of width kWidth are classified group.size() at a time, one per thread,
// into `kinds` (group.size() ints of shared memory), so that a long run of skipped tiles costs a
// shared-memory read per tile rather than a dependent global load. Every thread of the group
// calls it for every tile in increasing order with uniform arguments (it contains the group's
// barrier).
template <int kWidth, class Group = BlockGroup>
__device__ __forceinline__ TileKind key_tile_kind(int* kinds, int64_t tile, int64_t n_tiles, const int2* mm,
                                                  int64_t n_ev_tiles, int64_t kv_len, int64_t p0, int64_t p1,
                                                  Group const& group = Group{}) {
  // 32-bit: an int64 remainder is a ~100-instruction subroutine call, paid per key tile
  // (tile < 2^31: positions are int32).
  const int c = static_cast<int>(static_cast<uint32_t>(tile) % static_cast<uint32_t>(group.size()));
  if (c == 0) {
    group.sync();  // the previous batch has been read by every thread
    const int64_t mine = tile + group.rank();
    TileKind kind = TileKind::kSkip;
    if (mine < n_tiles) {
      const int64_t k0 = mine * kWidth;
      kind = classify_key_tile(key_tile_ev_range(mm, n_ev_tiles, k0, kWidth), k0, kWidth, kv_len, p0, p1);
    }
    kinds[group.rank()] = static_cast<int>(kind);
    group.sync();
  }
  return static_cast<TileKind>(kinds[c]);
}

// The first key tile of width BN from `from` on (of n_key_tiles) that some row of query tile
// `t` can see, with its kind; n_key_tiles when none is left. Uniform over the group (every
// thread of it must call it: key_tile_kind classifies tiles in batches, with barriers).
template <int BN, class Group = BlockGroup>
__device__ __forceinline__ int64_t next_live_tile(int64_t from, int64_t n_key_tiles, int* kinds_s, const int2* mm,
                                                  int64_t n_ev_tiles, const ShadowAttentionParams& p,
                                                  const QueryTile& t, TileKind& kind, Group const& group = Group{}) {
  for (int64_t tile = from; tile < n_key_tiles; ++tile) {
    kind = key_tile_kind<BN>(kinds_s, tile, n_key_tiles, mm, n_ev_tiles, p.kv_len, t.p0, t.p1, group);
    if (kind != TileKind::kSkip) return tile;
  }
  return n_key_tiles;
}

// Internal linkage: both translation units include this header and launch their own copy.
namespace {

// One warp per kEvTile keys: out[(b * Hkv + h) * n_tiles + t] = (min, max) of evicted_at.
__global__ void ev_minmax_kernel(const ShadowAttentionParams p, int64_t n_tiles, int2* __restrict__ out) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= p.batch * p.num_kv_heads * n_tiles) return;  // whole warps leave together
  const int64_t t = warp % n_tiles, bh = warp / n_tiles;
  const int64_t h = bh % p.num_kv_heads, b = bh / p.num_kv_heads;
  const int64_t j = t * kEvTile + lane;
  int lo = INT_MAX, hi = INT_MIN;
  if (j < p.kv_len) lo = hi = p.evicted_at[b * p.ev_stride[0] + h * p.ev_stride[1] + j];
#pragma unroll
  for (int o = 16; o > 0; o /= 2) {
    lo = min(lo, __shfl_xor_sync(kFullMask, lo, o));
    hi = max(hi, __shfl_xor_sync(kFullMask, hi, o));
  }
  if (lane == 0) out[warp] = make_int2(lo, hi);
}

// Number of kEvTile tiles per (batch, kv head), and the pre-pass buffer size in bytes.
inline int64_t ev_minmax_tiles(const ShadowAttentionParams& p) { return ceil_div(p.kv_len, kEvTile); }
inline size_t ev_minmax_bytes(const ShadowAttentionParams& p) {
  return static_cast<size_t>(p.batch * p.num_kv_heads * ev_minmax_tiles(p)) * sizeof(int2);
}
#if !defined(SHADOWKV_CUDA_EMULATION)  // a host compiler: no launches
inline void launch_ev_minmax(const ShadowAttentionParams& p, int2* buf, cudaStream_t stream) {
  const int64_t warps = p.batch * p.num_kv_heads * ev_minmax_tiles(p);
  if (warps == 0) return;
  constexpr int kThreads = 256;
  ev_minmax_kernel<<<grid_1d(ceil_div(warps * 32, kThreads), "ev_minmax_kernel"), kThreads, 0, stream>>>(
      p, ev_minmax_tiles(p), buf);
  check_launch("ev_minmax_kernel");
}
#endif

}  // namespace

}  // namespace cuda_attn
}  // namespace shadowkv
