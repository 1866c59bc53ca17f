// Host-only checks of the register <-> (row, col) maps that the CuTe attention kernels rely on
// (csrc/cuda/shadow_attention_cute.cuh). They are the error-prone part of a FlashAttention-style
// kernel, and CuTe's layout algebra runs on the host, so they are checked here without a GPU:
//   * the softmax's row view: a thread's row r holds one query row, and the four lanes of a
//     quad (lane ^ 1, lane ^ 2, the shuffles of the row reductions) hold all its columns once;
//   * the accumulator-as-A-operand view and as_a_operand: every register of P, read as the A
//     operand of P V, sits where the MMA's A fragment expects the same (row, key) element;
//   * a column of the row view is the same key in every row (one log entry per column);
//   * the output fragment covers each (row, d) of the block exactly once;
//   * each shared -> register copy (ldmatrix, also transposed) delivers to every register the
//     element the MMA expects there, and the transposed views of the partner tiles address
//     the same shared-memory element as the tile itself;
//   * the backward's two stages of two partner tiles fill their buffer exactly once.
// The same maps for the sm_90a kernels' warpgroup MMAs (shadow_attention_wgmma.cuh): score and
// output accumulators, P as the register A operand of O += P V, the V^T view, and the
// backward's partner stages in the 128-byte-swizzled wgmma layouts, with one warpgroup per block
// and with two (each warpgroup's shared-memory A operand is its own 64 rows), and the
// global -> shared copy of every tile shape those kernels load.
// Built by nvcc as plain host code (it never launches anything); returns non-zero on failure.
// The checks are in cute_layout_checks.cuh; the wgmma ones run from test_cute_layouts_wgmma.cu.
#include "cute_layout_checks.cuh"

int main() {
  check_traits<FwdTraits<__nv_bfloat16, 64>>("fwd bf16 d64");
  check_traits<FwdTraits<__nv_bfloat16, 128>>("fwd bf16 d128");
  check_traits<FwdTraits<__half, 64>>("fwd fp16 d64");
  check_traits<FwdTraits<__half, 128>>("fwd fp16 d128");
  check_traits<BwdTraits<__nv_bfloat16, 64>>("bwd bf16 d64");
  check_traits<BwdTraits<__nv_bfloat16, 128>>("bwd bf16 d128");
  check_traits<BwdTraits<__half, 128>>("bwd fp16 d128");
  check_copies<FwdTraits<__nv_bfloat16, 64>>("fwd bf16 d64");
  check_copies<FwdTraits<__nv_bfloat16, 128>>("fwd bf16 d128");
  check_copies<FwdTraits<__half, 128>>("fwd fp16 d128");
  check_copies<BwdTraits<__nv_bfloat16, 64>>("bwd bf16 d64");
  check_copies<BwdTraits<__nv_bfloat16, 128>>("bwd bf16 d128");
  check_stages<BwdTraits<__nv_bfloat16, 64>>("bwd bf16 d64");
  check_stages<BwdTraits<__half, 128>>("bwd fp16 d128");
  check_wgmma_layouts();
  return failures == 0 ? 0 : 1;
}
