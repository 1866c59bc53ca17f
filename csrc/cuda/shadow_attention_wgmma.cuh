// CuTe building blocks of the sm_90a (Hopper) shadow-attention forward: warpgroup MMAs
// (wgmma.mma_async) instead of the per-warp mma.sync of shadow_attention_cute.cuh. Private:
// included by shadow_attention_fwd_wgmma.cu and by the host-side layout test
// (tests/cpp/test_cute_layouts.cu), which checks the register maps below without a GPU.
//
// One warpgroup (4 warps, 128 threads) owns 64 query rows, one wgmma atom high. Per key tile:
//   S = Q K^T   wgmma 64 x BN x 16, both operands read from shared memory by descriptor;
//   O += P V    wgmma 64 x D x 16, P from registers (the S accumulator, rounded to 16 bits: the
//               accumulator and the register A operand line up, see acc_as_a_operand) and V
//               from shared memory, read "MN-major" (V is stored [keys][D], D contiguous).
// Shared tiles use the canonical 128-byte-swizzle wgmma layouts, which CuTe's descriptor
// builder checks at compile time; they are filled with 16-byte cp.async as in the sm_80 path.
#pragma once

#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/copy_traits_sm80.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "shadow_attention_cute.cuh"  // rounded_copy

namespace shadowkv {
namespace cuda_wgmma {

using namespace cute;

template <typename T, int D>
struct FwdTraits {
  static_assert(D == 64 || D == 128, "the wgmma forward covers head_dim 64 and 128");
  static_assert(std::is_same<T, __nv_bfloat16>::value || std::is_same<T, __half>::value, "16-bit inputs only");
  using Element = std::conditional_t<std::is_same<T, __half>::value, cute::half_t, cute::bfloat16_t>;

  static constexpr int kThreads = 128;  // one warpgroup
  static constexpr int kBlockM = 64;    // query rows per block: one wgmma atom
  static constexpr int kBlockN = 64;    // keys per tile (whole 32-key eviction-log tiles)
  static constexpr int kHeadDim = D;

  // S = Q K^T: M = query rows, N = keys, K = head_dim; both operands K-major in shared memory.
  using TiledMmaS = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<Int<kBlockM>, Int<kBlockN>, Int<D>>>()));
  // O += P V: M = query rows, N = head_dim, K = keys; A (P) in registers, B = V read MN-major.
  using TiledMmaO = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<Int<kBlockM>, Int<D>, Int<kBlockN>>, GMMA::Major::K,
                           GMMA::Major::MN>()));

  using SmemLayoutAtom = GMMA::Layout_K_SW128_Atom<Element>;  // 8 rows x 64 halves, 128-byte swizzle
  using SmemLayoutQ = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockM>, Int<D>>{}));
  using SmemLayoutKV = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockN>, Int<D>>{}));
  // V seen as [D][kBlockN] (the B operand of P V, indexed (n = d, k = key)); element (d, j) is
  // the tile's (j, d): only the view changes, not the bytes.
  using SmemLayoutVt =
      decltype(composition(SmemLayoutKV{}, make_layout(Shape<Int<D>, Int<kBlockN>>{}, GenRowMajor{})));

  // Global -> shared: 8 threads cover one 64-element row segment with 16-byte cp.async each.
  using GmemTiledCopy = decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>, Element>{},
                                                 Layout<Shape<Int<kThreads / 8>, _8>, Stride<_8, _1>>{},
                                                 Layout<Shape<_1, _8>>{}));

  static constexpr size_t kQBytes = kBlockM * D * sizeof(Element);
  static constexpr size_t kKVBytes = kBlockN * D * sizeof(Element);
  // The 128-byte swizzle is a function of the address bits: every tile starts on 1024 bytes.
  static_assert(kQBytes % 1024 == 0 && kKVBytes % 1024 == 0, "tiles must keep 1024-byte alignment");
};

// A wgmma accumulator layout ((2 cols, 2 rows, N / 8 col groups), MMA_M, MMA_N) seen as
// (rows = (2, MMA_M), cols = (2, N / 8, MMA_N)): the online softmax reduces along the second mode.
template <class Layout>
CUTE_HOST_DEVICE constexpr auto acc_rowcol(Layout acc) {
  static_assert(decltype(rank(acc))::value == 3, "expected an (MMA, MMA_M, MMA_N) accumulator layout");
  static_assert(decltype(rank<0>(acc))::value == 3, "expected a wgmma accumulator: ((2, 2, N / 8), M, N)");
  return make_layout(make_layout(get<0, 1>(acc), get<1>(acc)),
                     make_layout(get<0, 0>(acc), get<0, 2>(acc), get<2>(acc)));
}

// The accumulator registers of S (64 x N) seen as the register A operand of the 64 x . x 16
// wgmma that multiplies P: ((2, 2, 2), MMA_M, N / 16). Two neighbouring 8-column groups of C hold
// exactly one 16-wide k-slice of A, so P never leaves the registers.
template <class Layout>
CUTE_HOST_DEVICE constexpr auto acc_as_a_operand(Layout acc) {
  static_assert(decltype(rank(acc))::value == 3, "expected an (MMA, MMA_M, MMA_N) accumulator layout");
  auto l = logical_divide(acc, Shape<Shape<Underscore, Underscore, _2>, Underscore, Underscore>{});
  // l = ((2, 2, (2, N / 16)), MMA_M, MMA_N)
  return make_layout(make_layout(get<0, 0>(l), get<0, 1>(l), get<0, 2, 0>(l)), get<1>(l),
                     make_layout(get<0, 2, 1>(l), get<2>(l)));
}

// The S accumulator rounded to E and laid out as the register A operand (acc_as_a_operand).
template <typename E, class Acc>
CUTE_HOST_DEVICE auto as_a_operand(Acc const& acc) {
  return cuda_cute::rounded_copy<E>(acc, acc_as_a_operand(acc.layout()));
}

#if defined(__CUDACC__)
// acc (+)= A B over every k-slice, issued as one wgmma batch and waited for. kZero starts from
// zero (the first slice overwrites acc). B is a shared-memory descriptor fragment, A one too or
// (kRegisterA) a register fragment. The fences keep the compiler from touching acc (and
// register A) while the asynchronous MMAs own them.
template <bool kZero, bool kRegisterA, class Mma, class FragA, class FragB, class Acc>
__device__ __forceinline__ void gemm(Mma& mma, FragA& a, FragB const& b, Acc& acc) {
  if constexpr (kRegisterA) warpgroup_fence_operand(a);
  warpgroup_fence_operand(acc);
  warpgroup_arrive();
  mma.accumulate_ = kZero ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
  CUTE_UNROLL
  for (int k = 0; k < size<2>(a); ++k) {
    cute::gemm(mma, a(_, _, k), b(_, _, k), acc);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc);
  if constexpr (kRegisterA) warpgroup_fence_operand(a);
}

// Makes this thread's generic-proxy writes to shared memory (cp.async, zero fills) visible to
// the async proxy that wgmma reads shared memory through; a barrier must follow.
__device__ __forceinline__ void fence_smem_for_wgmma() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
#endif

}  // namespace cuda_wgmma
}  // namespace shadowkv
