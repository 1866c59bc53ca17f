// CuTe building blocks of the FlashAttention-2-style shadow-attention kernels (sm_80 mma.sync,
// also what sm_90a runs under SHADOWKV_ATTENTION_KERNEL=cute). Private: included by the kernel
// bodies (shadow_attention_{fwd,bwd}_cute.cuh, through Family below) and by the host-side layout
// test (tests/cpp/test_cute_layouts.cu), which checks the register <-> (row, col) maps below
// without a GPU.
//
// Every kernel has the same shape: a block owns kBlockM = 64 "own" rows (4 warps x 16 rows, one
// m16n8k16 atom high) and streams "partner" tiles of kBlockN rows. Forward and dQ: own = query
// rows, partners = key tiles; dK/dV: own = key rows, partners = query tiles. Scores and
// probabilities stay in registers: an accumulator fragment, rounded to 16 bits, is reused as
// the A operand of the next product (the layouts line up for m16n8k16, see acc_as_a_operand).
// Tiles live in swizzled shared memory, are filled with 16-byte cp.async and read with ldmatrix
// (a partner tile is read transposed when it is the B operand of P V, dS K, P^T dO or dS^T Q).
#pragma once

#include <cute/tensor.hpp>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "cp_async.cuh"  // 4-byte copies of log entries (stage_tile_log)

// SHADOWKV_EMULATED(Op): the hardware operation (MMA or copy atom) the CuTe kernels use: Op
// itself, or under SHADOWKV_CUDA_EMULATION (never set by a real build) its host emulation from
// tests/cpp/cute_emulation.h, which runs these kernels' own source on a CPU.
#if defined(SHADOWKV_CUDA_EMULATION)
#define SHADOWKV_EMULATED(...) ::shadowkv_emu::Emulated<__VA_ARGS__>
#else
#define SHADOWKV_EMULATED(...) __VA_ARGS__
#endif

namespace shadowkv {
namespace cuda_cute {

using namespace cute;

// Tile shapes, layouts and atoms of one (element type, head_dim, partner rows) instantiation.
template <typename T, int D, int BlockN>
struct TileTraits {
  static_assert(D == 64 || D == 128, "the CuTe kernels cover head_dim 64 and 128");
  static_assert(std::is_same<T, __nv_bfloat16>::value || std::is_same<T, __half>::value, "16-bit inputs only");
  using Input = T;  // the CUDA type of the tensors (outputs are written as it)
  using Element = std::conditional_t<std::is_same<T, __half>::value, cute::half_t, cute::bfloat16_t>;

  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockM = 16 * kWarps;  // own rows per block
  static constexpr int kBlockN = BlockN;       // partner rows per step
  static_assert(BlockN % 32 == 0, "partner tiles are whole kEvTile (32-key) tiles");
  static constexpr int kHeadDim = D;

  using MmaOp = SHADOWKV_EMULATED(std::conditional_t<std::is_same<T, __half>::value, SM80_16x8x16_F32F16F16F32_TN,
                                                     SM80_16x8x16_F32BF16BF16F32_TN>);
  // Warps stacked along M; the N tile of 16 (two 8-wide atoms) lets one ldmatrix.x4 feed B.
  using TiledMma = TiledMMA<MMA_Atom<MmaOp>, Layout<Shape<Int<kWarps>, _1, _1>>, Tile<Int<kBlockM>, _16, _16>>;

  // 64 halves (128 bytes) per swizzle row: the ldmatrix reads of 8 rows hit 8 different
  // 16-byte bank groups, and so do the 16-byte cp.async writes.
  using SmemLayoutAtom =
      decltype(composition(Swizzle<3, 3, 3>{}, Layout<Shape<_8, _64>, Stride<_64, _1>>{}));
  using SmemLayoutOwn = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockM>, Int<D>>{}));
  using SmemLayoutPartner = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockN>, Int<D>>{}));
  // A partner tile seen as [D][kBlockN], the B operand of P V (V^T) and friends; element (d, n)
  // is the tile's (n, d).
  using SmemLayoutPartnerT =
      decltype(composition(SmemLayoutPartner{}, make_layout(Shape<Int<D>, Int<kBlockN>>{}, GenRowMajor{})));
  using SmemLayoutPartnerTNoSwizzle = decltype(get_nonswizzle_portion(SmemLayoutPartnerT{}));

  using SmemCopyAtom = Copy_Atom<SHADOWKV_EMULATED(SM75_U32x4_LDSM_N), Element>;  // row-major operands
  using SmemCopyAtomTransposed = Copy_Atom<SHADOWKV_EMULATED(SM75_U16x8_LDSM_T), Element>;  // transposed B operands

  // Global -> shared: 8 threads cover one 64-element row segment with 16-byte cp.async each.
  using GmemLayoutAtom = Layout<Shape<Int<kThreads / 8>, _8>, Stride<_8, _1>>;
  using GmemTiledCopy =
      decltype(make_tiled_copy(Copy_Atom<SHADOWKV_EMULATED(SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>), Element>{},
                               GmemLayoutAtom{}, Layout<Shape<_1, _8>>{}));

  static constexpr size_t kOwnBytes = kBlockM * D * sizeof(Element);
  static constexpr size_t kPartnerBytes = kBlockN * D * sizeof(Element);
};

// Forward: 64 query rows against key tiles of 64 (Q, K, V in 48 KB at head_dim 128).
template <typename T, int D>
using FwdTraits = TileTraits<T, D, 64>;
// Backward: 32-row partner tiles (two own tiles and two stages of two partner tiles: 64 KB at
// head_dim 128), so that two score-sized accumulators and two head_dim-wide ones fit the
// registers.
template <typename T, int D>
using BwdTraits = TileTraits<T, D, 32>;

// Two stages of two partner tiles each (the backward's K and V, or Q and dO), for double
// buffering: stage s, tile j sits (2 s + j) partner tiles past `base`. Every offset is a whole
// number of swizzle periods (1 KB), so each tile's swizzle lines up with its address bits the
// same way.
template <class Tr>
struct PartnerStages {
  using E = typename Tr::Element;
  static constexpr size_t kBytes = 4 * Tr::kPartnerBytes;
  static_assert(Tr::kPartnerBytes % 1024 == 0, "a partner tile is a whole number of swizzle periods");
  E* base;
  CUTE_HOST_DEVICE explicit PartnerStages(E* b) : base(b) {}
  template <class Ptr>
  CUTE_HOST_DEVICE explicit PartnerStages(Ptr p) : base(raw_pointer_cast(p)) {}
  CUTE_HOST_DEVICE auto tile(int stage, int j) const {
    return make_tensor(make_smem_ptr(base + (2 * stage + j) * (Tr::kBlockN * Tr::kHeadDim)),
                       typename Tr::SmemLayoutPartner{});
  }
  // The same tile seen as [D][kBlockN] (a transposed B operand).
  template <class Tile>
  CUTE_HOST_DEVICE static auto transposed(Tile const& t) {
    return make_tensor(t.data(), typename Tr::SmemLayoutPartnerT{});
  }
};

// An accumulator layout (MMA = (2 cols, 2 rows), MMA_M, MMA_N) of SM80_16x8 seen as
// (rows = (2, MMA_M), cols = (2, MMA_N)): the online softmax reduces along the second mode.
template <class Layout>
CUTE_HOST_DEVICE constexpr auto acc_rowcol(Layout acc) {
  static_assert(decltype(rank(acc))::value == 3, "expected an (MMA, MMA_M, MMA_N) accumulator layout");
  auto l = logical_divide(acc, Shape<_2>{});  // ((2, 2), MMA_M, MMA_N)
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<2>(l)));
}

// The same accumulator registers seen as the A operand of an m16n8k16 MMA:
// (MMA = (4, 2), MMA_M, MMA_N / 2). Two neighbouring 16x8 C atoms hold exactly the 16x16 A
// fragment of the next product, so P never leaves the registers.
template <class Layout>
CUTE_HOST_DEVICE constexpr auto acc_as_a_operand(Layout acc) {
  static_assert(decltype(rank(acc))::value == 3, "expected an (MMA, MMA_M, MMA_N) accumulator layout");
  auto l = logical_divide(acc, Shape<Underscore, Underscore, _2>{});  // (4, MMA_M, (2, MMA_N / 2))
  return make_layout(make_layout(get<0>(l), get<2, 0>(l)), get<1>(l), get<2, 1>(l));
}

// ------------------------------------------------------------------------------------------
// Device building blocks.

// The (Rows, D) tile at row r0 of a global [*, D] matrix whose rows are `stride` apart.
template <int Rows, int D, typename E>
__device__ __forceinline__ auto gmem_tile(const E* base, int64_t stride, int64_t r0) {
  return make_tensor(make_gmem_ptr(base + r0 * stride), Shape<Int<Rows>, Int<D>>{}, make_stride(stride, _1{}));
}

// The rows of a (rows, D) global tile for which keep(row) holds into shared memory with
// cp.async; the other rows become zeros, so that no MMA reads garbage (0 * NaN = NaN).
// every_row (the caller knows it from the tile's kind or its row count; it need not be the same
// in every thread): keep holds for every row, so one unconditional copy does. Why: with a
// predicate and a branch per row, the K/V tile loads of the wgmma forward took ~1300 of the
// ~2500 instructions of its key-tile loop (SASS), and that kernel issues from only 2 warps per
// scheduler (Nsight Compute on an H200: issue-bound, 4-8 cycles per issue).
template <class TiledCopy, class Src, class Dst, class Coord, class Keep>
__device__ __forceinline__ void copy_rows_if(TiledCopy const& tiled_copy, Src const& src, Dst&& dst,
                                             Coord const& coord, Keep const& keep, bool every_row) {
  if (every_row) {
    copy(tiled_copy, src, dst);
    return;
  }
  CUTE_UNROLL
  for (int m = 0; m < size<1>(src); ++m) {
    if (keep(static_cast<int>(get<0>(coord(0, m, 0))))) {
      copy(tiled_copy, src(_, m, _), dst(_, m, _));
    } else {
      clear(dst(_, m, _));
    }
  }
}

// Zeroes the rows r with !keep(r) of this thread's partition `dst` of a shared tile (coord: its
// partition of the tile's identity tensor, as for copy_rows_if): the rows copy_rows_if would
// have zeroed instead of copying, once the copies landed.
template <class Dst, class Coord, class Keep>
__device__ __forceinline__ void clear_rows_unless(Dst&& dst, Coord const& coord, Keep const& keep) {
  CUTE_UNROLL
  for (int m = 0; m < size<1>(dst); ++m) {
    if (!keep(static_cast<int>(get<0>(coord(0, m, 0))))) clear(dst(_, m, _));
  }
}

// Rows [0, valid_rows) of a tile of Rows rows, as copy_rows_if.
template <int Rows, class TiledCopy, class Src, class Dst, class Coord>
__device__ __forceinline__ void copy_rows(TiledCopy const& tiled_copy, Src const& src, Dst&& dst, Coord const& coord,
                                          int64_t valid_rows) {
  copy_rows_if(tiled_copy, src, static_cast<Dst&&>(dst), coord, [valid_rows](int row) { return row < valid_rows; },
               valid_rows >= Rows);
}

// Rows [r0, r0 + Rows) of two global [*, D] matrices (a, b: Q and dO, or K and V) into the
// shared tiles dst_a and dst_b with cp.async (gmem_thr is gmem_copy's slice for this thread,
// coord its partition of a (Rows, D) identity tensor); rows r with !keep(r) become zeros
// (every_row: keep holds for all, as copy_rows_if).
template <int Rows, int D, class GmemCopy, class GmemThr, class Coord, class Keep, class E, class DstA, class DstB>
__device__ __forceinline__ void load_pair(GmemCopy const& gmem_copy, GmemThr const& gmem_thr, Coord const& coord,
                                          int64_t r0, Keep const& keep, bool every_row, const E* a, int64_t a_stride,
                                          DstA&& dst_a, const E* b, int64_t b_stride, DstB&& dst_b) {
  copy_rows_if(gmem_copy, gmem_thr.partition_S(gmem_tile<Rows, D>(a, a_stride, r0)), gmem_thr.partition_D(dst_a),
               coord, keep, every_row);
  copy_rows_if(gmem_copy, gmem_thr.partition_S(gmem_tile<Rows, D>(b, b_stride, r0)), gmem_thr.partition_D(dst_b),
               coord, keep, every_row);
}

// One thread's shared -> register copies (ldmatrix) for the block's MMAs: `a` for A operands
// (row-major [rows][D] tiles), `b` for B operands ([partner rows][D]) and `bt` for transposed
// B operands (a partner tile seen as [D][partner rows]). Partition a shared tile with
// a.partition_S / b.partition_S / bt.partition_S.
template <class Tr>
struct OperandCopies {
  using Mma = typename Tr::TiledMma;
  using CopyA = decltype(make_tiled_copy_A(typename Tr::SmemCopyAtom{}, Mma{}));
  using CopyB = decltype(make_tiled_copy_B(typename Tr::SmemCopyAtom{}, Mma{}));
  using CopyBt = decltype(make_tiled_copy_B(typename Tr::SmemCopyAtomTransposed{}, Mma{}));
  CopyA copy_a;
  CopyB copy_b;
  CopyBt copy_bt;
  decltype(CopyA{}.get_thread_slice(0)) a;
  decltype(CopyB{}.get_thread_slice(0)) b;
  decltype(CopyBt{}.get_thread_slice(0)) bt;
  __device__ explicit OperandCopies(int tid)
      : a(copy_a.get_thread_slice(tid)), b(copy_b.get_thread_slice(tid)), bt(copy_bt.get_thread_slice(tid)) {}
};

// acc += A B with both operands read from shared memory (sA from ops.a.partition_S, sB from
// ops.b.partition_S) one k-slice ahead of the MMAs.
template <class Acc, class RA, class RB, class SA, class SB, class Mma, class Ops>
__device__ __forceinline__ void gemm_ss(Acc& acc, RA& rA, RB& rB, SA const& sA, SB const& sB, Mma const& mma,
                                        Ops const& ops) {
  Tensor rA_view = ops.a.retile_D(rA);
  Tensor rB_view = ops.b.retile_D(rB);
  copy(ops.copy_a, sA(_, _, _0{}), rA_view(_, _, _0{}));
  copy(ops.copy_b, sB(_, _, _0{}), rB_view(_, _, _0{}));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(rA); ++k) {
    if (k + 1 < size<2>(rA)) {
      copy(ops.copy_a, sA(_, _, k + 1), rA_view(_, _, k + 1));
      copy(ops.copy_b, sB(_, _, k + 1), rB_view(_, _, k + 1));
    }
    cute::gemm(mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// acc += A B with A already in registers (P, dS) and a transposed B operand (sB from
// ops.bt.partition_S) read from shared memory a k-slice ahead.
template <class Acc, class RA, class RB, class SB, class Mma, class Ops>
__device__ __forceinline__ void gemm_rs(Acc& acc, RA const& rA, RB& rB, SB const& sB, Mma const& mma,
                                        Ops const& ops) {
  Tensor rB_view = ops.bt.retile_D(rB);
  copy(ops.copy_bt, sB(_, _, _0{}), rB_view(_, _, _0{}));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(rA); ++k) {
    if (k + 1 < size<2>(rA)) copy(ops.copy_bt, sB(_, _, k + 1), rB_view(_, _, k + 1));
    cute::gemm(mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// The eviction-log entries of this thread's score columns from a key tile's entries staged in
// shared memory: `sev` [tile width], entry i for key k0 + i (past kv_len an entry that hides the
// key from every query: kEvOutOfRange, or 0 from stage_tile_log), all `missing` unless `load`
// (only partial tiles read them). Columns are taken relative to the thread's first one: their
// offsets are compile-time constants, where absolute 64-bit keys were 32 values that the
// compiler kept live across the key-tile loop (and spilled in the warp-specialised forward).
template <int kCols, class RowCol>
__device__ __forceinline__ void load_staged_column_log(int (&ev)[kCols], const int* sev, RowCol const& rc, bool load,
                                                       int missing) {
  const int col0 = get<1>(rc(0, 0));
  const int* base = sev + col0;  // offsets from the thread's first column: compile-time constants
  CUTE_UNROLL
  for (int c = 0; c < kCols; ++c) ev[c] = load ? base[get<1>(rc(0, c)) - col0] : missing;
}

// A key tile's log entries into shared memory for load_staged_column_log: sev[i] = the entry of
// key k0 + i, i < width, by the block's `threads` threads, with 4-byte cp.async in the caller's
// copy group (no thread waits for them: they land with the tile's K/V at the caller's wait).
// Keys past kv_len read 0, which hides them from every query (positions are >= 0) as
// kEvOutOfRange does. The callers stage a partial tile's entries with its K/V prefetch, a wait
// and a block barrier before the tile's row tests and masks read them: each thread then reads
// shared memory instead of waiting on global loads right after its scores.
__device__ __forceinline__ void stage_tile_log(int* sev, const int32_t* evg, int64_t k0, int width, int64_t kv_len,
                                               int tid, int threads) {
  for (int i = tid; i < width; i += threads) {
    const bool in_range = k0 + i < kv_len;
    cuda_common::cp_async_4(sev + i, in_range ? evg + k0 + i : evg, in_range);
  }
}

// A copy of accumulator registers rounded to the input type E, indexed through `view` (the
// accumulator's own registers with their modes regrouped, e.g. as an MMA A operand). Returned
// by value: it is a register array of its own.
template <typename E, class Acc, class View>
CUTE_HOST_DEVICE auto rounded_copy(Acc const& acc, View view) {
  Tensor r = make_tensor<E>(view);
  Tensor r_acc = make_tensor(r.data(), acc.layout());  // the same registers, indexed like acc
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) r_acc(i) = static_cast<E>(acc(i));
  return r;
}

// The accumulator rounded to E and laid out as the A operand of an m16n8k16 MMA.
template <typename E, class Acc>
CUTE_HOST_DEVICE auto as_a_operand(Acc const& acc) {
  return rounded_copy<E>(acc, acc_as_a_operand(acc.layout()));
}

// Reductions over the four lanes of a quad, which hold one accumulator row between them.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

#if defined(__CUDACC__) || defined(SHADOWKV_CUDA_EMULATION)
// The sm_80 family of the CuTe kernels, as the kernel bodies (shadow_attention_fwd_cute.cuh,
// shadow_attention_bwd_cute.cuh) use it: shared memory, accumulators and their (row, col)
// views, and the two products of every kernel (cuda_wgmma::Family is the sm_90a one):
//   scores: acc = A B^T, A an own tile made resident by own(), B a partner tile [rows][D];
//   update: acc += A B,  A registers (a rounded accumulator), B a partner tile read as [D][rows].
// Operands are read from shared memory with ldmatrix a k-slice ahead of the mma.sync calls.
template <class Tr>
struct Family {
  using Traits = Tr;
  static constexpr const char* kName = "cute";
  // Where the kernel bodies are compiled (elsewhere they trap; the host never launches them).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  static constexpr bool kBody = false;
#else
  static constexpr bool kBody = true;
#endif
  static constexpr size_t kSmemSlack = 0;  // dynamic shared memory beyond the tiles' bytes
  // One copy of the dQ kernel's dS step (ds_by_query_rows): two made its D = 64 body spill (sm_90a).
  static constexpr bool kTwoMaskCopies = false;
  static constexpr bool kAtomicDq = false;  // dQ by its own kernel (cuda_wgmma::FusedFamily)
  static constexpr size_t kExtraSmem = 0;

  using Mma = typename Tr::TiledMma;
  Mma mma;
  decltype(Mma{}.get_thread_slice(0)) thr;
  OperandCopies<Tr> s2r;
  __device__ explicit Family(int tid) : thr(mma.get_thread_slice(tid)), s2r(tid) {}

  __device__ static unsigned char* smem() {
#if defined(SHADOWKV_CUDA_EMULATION) && !defined(__CUDA_ARCH__)
    return static_cast<unsigned char*>(shadowkv_emu::dynamic_shared_memory());
#else
    extern __shared__ __align__(128) unsigned char shadowkv_cute_smem[];
    return shadowkv_cute_smem;
#endif
  }
  // Hands shared-memory tiles written by this thread to the products; a barrier follows.
  __device__ static void publish() {}  // ldmatrix reads through the same (generic) proxy

  __device__ auto score_acc() const { return partition_fragment_C(mma, Shape<Int<Tr::kBlockM>, Int<Tr::kBlockN>>{}); }
  __device__ auto out_acc() const { return partition_fragment_C(mma, Shape<Int<Tr::kBlockM>, Int<Tr::kHeadDim>>{}); }
  __device__ auto score_coords() const {
    return thr.partition_C(make_identity_tensor(Shape<Int<Tr::kBlockM>, Int<Tr::kBlockN>>{}));
  }
  __device__ auto out_coords() const {
    return thr.partition_C(make_identity_tensor(Shape<Int<Tr::kBlockM>, Int<Tr::kHeadDim>>{}));
  }
  // An accumulator (or its coordinates) seen as (rows, cols).
  template <class Acc>
  __device__ static auto rowcol(Acc&& acc) {
    return make_tensor(acc.data(), acc_rowcol(acc.layout()));
  }
  // An accumulator rounded to the input type as the A operand of an update.
  template <class Acc>
  __device__ static auto a_operand(Acc const& acc) {
    return as_a_operand<typename Tr::Element>(acc);
  }

  // An own tile as the A operand of scores: its register fragment and its ldmatrix source.
  template <class R, class S>
  struct Resident {
    R r;
    S s;
  };
  template <class Own>
  __device__ auto own(Own const& tile) const {
    auto r = thr.partition_fragment_A(tile);
    auto s = s2r.a.partition_S(tile);
    return Resident<decltype(r), decltype(s)>{r, s};
  }

  template <class Acc, class A, class Partner>
  __device__ void scores(Acc& acc, A& a, Partner const& b) {
    Tensor rb = thr.partition_fragment_B(b);
    clear(acc);
    gemm_ss(acc, a.r, rb, a.s, s2r.b.partition_S(b), mma, s2r);
  }
  template <class Acc1, class A1, class P1, class Acc2, class A2, class P2>
  __device__ void scores_pair(Acc1& acc1, A1& a1, P1 const& b1, Acc2& acc2, A2& a2, P2 const& b2) {
    scores(acc1, a1, b1);
    scores(acc2, a2, b2);
  }

  // (RA& as in the wgmma family, which fences the register operand.)
  template <class Acc, class RA, class Partner>
  __device__ void update(Acc& acc, RA& ra, Partner const& b) {
    Tensor rbt = thr.partition_fragment_B(
        make_tensor(raw_pointer_cast(b.data()), typename Tr::SmemLayoutPartnerTNoSwizzle{}));
    gemm_rs(acc, ra, rbt, s2r.bt.partition_S(make_tensor(b.data(), typename Tr::SmemLayoutPartnerT{})), mma, s2r);
  }
  template <class Acc1, class RA1, class P1, class Acc2, class RA2, class P2>
  __device__ void update_pair(Acc1& acc1, RA1& a1, P1 const& b1, Acc2& acc2, RA2& a2, P2 const& b2) {
    update(acc1, a1, b1);
    update(acc2, a2, b2);
  }
};
#endif

}  // namespace cuda_cute
}  // namespace shadowkv
