// The sm_90a wgmma kernels' register and shared-memory maps (shadow_attention_wgmma.cuh), as
// test_cute_layouts.cu's comment lists them; main() is there.
#include "cute_layout_checks.cuh"

void check_wgmma_layouts() {
  check_wgmma<shadowkv::cuda_wgmma::FwdTraits<__nv_bfloat16, 64>>("fwd bf16 d64");
  check_wgmma<shadowkv::cuda_wgmma::FwdTraits<__nv_bfloat16, 128>>("fwd bf16 d128");
  check_wgmma<shadowkv::cuda_wgmma::FwdTraits<__half, 128>>("fwd fp16 d128");
  check_wgmma<shadowkv::cuda_wgmma::FwdTraits<__half, 64>>("fwd fp16 d64");
  check_stages<shadowkv::cuda_wgmma::BwdTraits<__nv_bfloat16, 64>>("wgmma bwd bf16 d64");
  check_stages<shadowkv::cuda_wgmma::BwdTraits<__half, 128>>("wgmma bwd fp16 d128");
  check_wgmma<shadowkv::cuda_wgmma::Fwd2Traits<__nv_bfloat16, 64>>("wgmma 2wg bf16 d64");
  check_wgmma<shadowkv::cuda_wgmma::Fwd2Traits<__nv_bfloat16, 128>>("wgmma 2wg bf16 d128");
  check_wgmma<shadowkv::cuda_wgmma::Fwd2Traits<__half, 128>>("wgmma 2wg fp16 d128");
  check_stages<shadowkv::cuda_wgmma::Fwd2Traits<__nv_bfloat16, 128>>("wgmma 2wg fwd bf16 d128");
  check_stages<shadowkv::cuda_wgmma::Fwd2Traits<__half, 64>>("wgmma 2wg fwd fp16 d64");
  check_stages<shadowkv::cuda_wgmma::Bwd2Traits<__nv_bfloat16, 128>>("wgmma 2wg bwd bf16 d128");
  // The backward's two-warpgroup traits (64-row partner tiles) are their own maps since the
  // forward's went to 128-key tiles.
  check_wgmma<shadowkv::cuda_wgmma::Bwd2Traits<__nv_bfloat16, 64>>("wgmma 2wg bwd bf16 d64");
  check_wgmma<shadowkv::cuda_wgmma::Bwd2Traits<__nv_bfloat16, 128>>("wgmma 2wg bwd bf16 d128");
  check_wgmma<shadowkv::cuda_wgmma::Bwd2Traits<__half, 128>>("wgmma 2wg bwd fp16 d128");
  check_wgmma<shadowkv::cuda_wgmma::Fwd2Traits<__half, 64>>("wgmma 2wg fp16 d64");
  // Own tiles (kBlockM rows) and partner tiles (kBlockN rows) of each wgmma configuration.
  namespace W = shadowkv::cuda_wgmma;
  check_gmem_copy<W::FwdTraits<__nv_bfloat16, 128>, 64>("wgmma fwd d128");
  check_gmem_copy<W::FwdTraits<__nv_bfloat16, 64>, 64>("wgmma fwd d64");
  check_gmem_copy<W::Fwd2Traits<__nv_bfloat16, 128>, 128>("wgmma 2wg fwd d128");
  check_gmem_copy<W::Fwd2Traits<__half, 64>, 128>("wgmma 2wg fwd d64");
  check_gmem_copy<W::Bwd2Traits<__nv_bfloat16, 128>, 128>("wgmma 2wg bwd own d128");
  check_gmem_copy<W::Bwd2Traits<__nv_bfloat16, 128>, 64>("wgmma 2wg bwd partner d128");
  check_gmem_copy<W::Bwd2Traits<__half, 64>, 64>("wgmma 2wg bwd partner d64");
}
