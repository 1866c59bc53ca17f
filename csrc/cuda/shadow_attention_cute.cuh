// CuTe building blocks of the FlashAttention-2-style shadow-attention kernels (sm_80 mma.sync,
// also what sm_90a runs until a wgmma/TMA path exists). Private: included by
// shadow_attention_fwd_cute.cu and by the host-side layout test (tests/cpp/test_cute_layouts.cu),
// which checks the register <-> (row, col) maps below without a GPU.
//
// One block owns kBlockM = 64 query rows (4 warps x 16 rows, one m16n8k16 atom high) and walks
// the key tiles of kBlockN = 64 keys. Scores S = Q K^T and probabilities P stay in registers:
// the accumulator fragment of S, rounded to 16 bits, is reused as the A operand of P V (the
// layouts line up for m16n8k16, see acc_as_a_operand). Q, K, V tiles live in swizzled shared
// memory, are filled with 16-byte cp.async and read with ldmatrix (V transposed on the fly).
#pragma once

#include <cute/tensor.hpp>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

namespace shadowkv {
namespace cuda_cute {

using namespace cute;

// Tile shapes, layouts and atoms of one (element type, head_dim) instantiation.
template <typename T, int D>
struct FwdTraits {
  static_assert(D == 64 || D == 128, "the CuTe kernels cover head_dim 64 and 128");
  static_assert(std::is_same<T, __nv_bfloat16>::value || std::is_same<T, __half>::value, "16-bit inputs only");
  using Element = std::conditional_t<std::is_same<T, __half>::value, cute::half_t, cute::bfloat16_t>;

  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockM = 16 * kWarps;  // query rows per block
  static constexpr int kBlockN = 64;           // keys per step (a multiple of kEvTile = 32)
  static constexpr int kHeadDim = D;

  using MmaOp = std::conditional_t<std::is_same<T, __half>::value, SM80_16x8x16_F32F16F16F32_TN,
                                   SM80_16x8x16_F32BF16BF16F32_TN>;
  // Warps stacked along M; the N tile of 16 (two 8-wide atoms) lets one ldmatrix.x4 feed B.
  using TiledMma = TiledMMA<MMA_Atom<MmaOp>, Layout<Shape<Int<kWarps>, _1, _1>>, Tile<Int<kBlockM>, _16, _16>>;

  // 64 halves (128 bytes) per swizzle row: the ldmatrix reads of 8 rows hit 8 different
  // 16-byte bank groups, and so do the 16-byte cp.async writes.
  using SmemLayoutAtom =
      decltype(composition(Swizzle<3, 3, 3>{}, Layout<Shape<_8, _64>, Stride<_64, _1>>{}));
  using SmemLayoutQ = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockM>, Int<D>>{}));
  using SmemLayoutKV = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockN>, Int<D>>{}));
  // V seen as [D][kBlockN] (the B operand of P V is V^T); element (d, n) is V's (n, d).
  using SmemLayoutVt =
      decltype(composition(SmemLayoutKV{}, make_layout(Shape<Int<D>, Int<kBlockN>>{}, GenRowMajor{})));
  using SmemLayoutVtNoSwizzle = decltype(get_nonswizzle_portion(SmemLayoutVt{}));

  using SmemCopyAtom = Copy_Atom<SM75_U32x4_LDSM_N, Element>;            // Q, K: row-major tiles
  using SmemCopyAtomTransposed = Copy_Atom<SM75_U16x8_LDSM_T, Element>;  // V^T

  // Global -> shared: 8 threads cover one 64-element row segment with 16-byte cp.async each.
  using GmemLayoutAtom = Layout<Shape<Int<kThreads / 8>, _8>, Stride<_8, _1>>;
  using GmemTiledCopy = decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>, Element>{},
                                                 GmemLayoutAtom{}, Layout<Shape<_1, _8>>{}));

  static constexpr int kSmemQ = kBlockM * D;
  static constexpr int kSmemKV = kBlockN * D;
  static constexpr size_t kSmemBytes = (kSmemQ + 2 * kSmemKV) * sizeof(Element);
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

}  // namespace cuda_cute
}  // namespace shadowkv
