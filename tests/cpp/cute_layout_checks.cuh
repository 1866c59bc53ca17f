// The checks of test_cute_layouts.cu (its comment says what they check), shared by its two
// translation units: the mma.sync kernels' maps there, the wgmma kernels' in
// test_cute_layouts_wgmma.cu. Two, so that the build compiles them on two cores: as one file
// nvcc took ~113 s with the other core idle (2026-11-29, CI's stage 3).
#pragma once

#include <cstdio>
#include <set>
#include <utility>
#include <vector>

#include "shadow_attention_cute.cuh"
#include "shadow_attention_wgmma.cuh"

using namespace cute;
using shadowkv::cuda_cute::acc_as_a_operand;
using shadowkv::cuda_cute::acc_rowcol;
using shadowkv::cuda_cute::BwdTraits;
using shadowkv::cuda_cute::FwdTraits;

inline int failures = 0;  // one count for both translation units

#define EXPECT(cond, ...)                                \
  do {                                                   \
    if (!(cond)) {                                       \
      if (failures < 20) std::printf(__VA_ARGS__);       \
      ++failures;                                        \
    }                                                    \
  } while (0)

// The smem -> register copy `s2r` (ldmatrix .x4, plain or .trans) of an operand of logical
// shape `shape`, emulated from the PTX semantics: in each warp, lane 8i + r supplies the address
// of row r of 8x8 matrix i (what partition_S says the lane points at: 8 consecutive elements);
// lane t then receives, in register i, elements 2(t%4) and 2(t%4)+1 of row t/4 of matrix i,
// or with .trans elements t/4 of rows 2(t%4) and 2(t%4)+1. Every received element must be the
// one the MMA reads from that register (partition_A / partition_B through retile_D).
template <class Copy, class Mma, class Shape, class Part>
void check_ldmatrix_feeds_mma(const char* name, const char* what, Copy const& s2r, Mma const& mma, Shape shape,
                              Part part, bool trans) {
  const int threads = int(size(mma));
  using Coord = std::pair<int, int>;
  std::vector<std::vector<Coord>> src(threads), want(threads);  // per thread, flattened over calls
  int per_thread = -1;
  for (int tid = 0; tid < threads; ++tid) {
    auto thr_copy = s2r.get_thread_slice(tid);
    Tensor s = thr_copy.partition_S(make_identity_tensor(shape));
    Tensor d = thr_copy.retile_D(part(mma.get_thread_slice(tid), make_identity_tensor(shape)));
    EXPECT(size(s) == size(d) && size<0>(s) == 8, "%s: %s: expected 8 elements per lane and call\n", name, what);
    for (int i = 0; i < size(s); ++i) {
      src[tid].emplace_back(int(get<0>(s(i))), int(get<1>(s(i))));
      want[tid].emplace_back(int(get<0>(d(i))), int(get<1>(d(i))));
    }
    per_thread = int(size(s));
  }
  for (int tid = 0; tid < threads; ++tid) {
    const int warp0 = tid / 32 * 32, lane = tid % 32;
    for (int call = 0; call < per_thread / 8; ++call) {
      for (int j = 0; j < 8; ++j) {
        const int mat = j / 2, e = j % 2;
        const Coord got = trans ? src[warp0 + 8 * mat + 2 * (lane % 4) + e][call * 8 + lane / 4]
                                : src[warp0 + 8 * mat + lane / 4][call * 8 + 2 * (lane % 4) + e];
        const Coord exp = want[tid][call * 8 + j];
        EXPECT(got == exp, "%s: %s tid %d call %d value %d receives (%d,%d), the MMA expects (%d,%d)\n", name, what,
               tid, call, j, got.first, got.second, exp.first, exp.second);
      }
    }
  }
}

template <typename Tr>
void check_copies(const char* name) {
  constexpr int M = Tr::kBlockM, N = Tr::kBlockN, D = Tr::kHeadDim;
  typename Tr::TiledMma mma;
  auto part_a = [](auto thr, auto t) { return thr.partition_A(t); };
  auto part_b = [](auto thr, auto t) { return thr.partition_B(t); };
  check_ldmatrix_feeds_mma(name, "own rows as A (Q; K, V in dK/dV)",
                           make_tiled_copy_A(typename Tr::SmemCopyAtom{}, mma), mma, Shape<Int<M>, Int<D>>{}, part_a,
                           false);
  check_ldmatrix_feeds_mma(name, "partner rows as B (K, V; Q, dO)",
                           make_tiled_copy_B(typename Tr::SmemCopyAtom{}, mma), mma, Shape<Int<N>, Int<D>>{}, part_b,
                           false);
  check_ldmatrix_feeds_mma(name, "partner^T as B (V^T, K^T; dO^T, Q^T)",
                           make_tiled_copy_B(typename Tr::SmemCopyAtomTransposed{}, mma), mma, Shape<Int<D>, Int<N>>{},
                           part_b, true);
  typename Tr::SmemLayoutPartner partner;
  typename Tr::SmemLayoutPartnerT partner_t;
  for (int n = 0; n < N; ++n)
    for (int d = 0; d < D; ++d)
      EXPECT(partner_t(d, n) == partner(n, d), "%s: transposed view (%d,%d) -> %d, tile (%d,%d) -> %d\n", name, d, n,
             int(partner_t(d, n)), n, d, int(partner(n, d)));
  std::printf("%s copies: %s\n", name, failures == 0 ? "ok" : "FAILED");
}

// One thread's output fragment `tOcO` (coordinates) and its row view `orc`: counted into
// `out_cover`, and every row of the view is the score row view `rc`'s row r (the same softmax
// state rescales and normalises it).
template <class OutC, class OutRC, class ScoreRC>
void check_output_rows(const char* name, int tid, OutC const& tOcO, OutRC const& orc, ScoreRC const& rc,
                       std::vector<std::vector<int>>& out_cover) {
  for (int i = 0; i < size(tOcO); ++i) out_cover[get<0>(tOcO(i))][get<1>(tOcO(i))] += 1;
  EXPECT(size<0>(orc) == size<0>(rc), "%s: output and score row views differ in length\n", name);
  for (int r = 0; r < size<0>(orc); ++r)
    for (int c = 0; c < size<1>(orc); ++c)
      EXPECT(get<0>(orc(r, c)) == get<0>(rc(r, 0)), "%s: tid %d output row %d is not score row %d\n", name, tid,
             int(get<0>(orc(r, c))), int(get<0>(rc(r, 0))));
}

// Every score (row, key) and every output (row, d) of the block is held exactly once.
inline void check_cover(const char* name, const std::vector<std::vector<int>>& score_cover,
                 const std::vector<std::vector<int>>& out_cover) {
  for (size_t row = 0; row < score_cover.size(); ++row) {
    for (size_t col = 0; col < score_cover[row].size(); ++col)
      EXPECT(score_cover[row][col] == 1, "%s: score (%d,%d) held %d times\n", name, int(row), int(col),
             score_cover[row][col]);
    for (size_t d = 0; d < out_cover[row].size(); ++d)
      EXPECT(out_cover[row][d] == 1, "%s: output (%d,%d) held %d times\n", name, int(row), int(d), out_cover[row][d]);
  }
}

template <typename Tr>
void check_traits(const char* name) {
  constexpr int M = Tr::kBlockM, N = Tr::kBlockN, D = Tr::kHeadDim;
  typename Tr::TiledMma mma;
  static_assert(decltype(size(mma))::value == Tr::kThreads, "one MMA thread per block thread");

  // columns seen per (row) by each quad, to check the row reductions' coverage
  std::vector<std::vector<int>> cols_of_row(M, std::vector<int>(N, 0));
  std::vector<std::vector<int>> out_cover(M, std::vector<int>(D, 0));
  for (int tid = 0; tid < Tr::kThreads; ++tid) {
    auto thr = mma.get_thread_slice(tid);
    Tensor cS = make_identity_tensor(Shape<Int<M>, Int<N>>{});
    Tensor tScS = thr.partition_C(cS);  // (MMA, MMA_M, MMA_N) of (row, col)
    Tensor rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));
    const int warp = tid / 32, lane = tid % 32;
    for (int r = 0; r < size<0>(rc); ++r) {
      const int row = get<0>(rc(r, 0));
      EXPECT(row / 16 == warp, "%s: tid %d row-view row %d is query row %d, outside warp %d's strip\n", name, tid, r,
             row, warp);
      EXPECT(row % 8 == lane / 4, "%s: tid %d holds row %d, not lane/4 (mod 8) = %d\n", name, tid, row, lane / 4);
      for (int c = 0; c < size<1>(rc); ++c) {
        EXPECT(get<0>(rc(r, c)) == row, "%s: tid %d row-view row %d mixes query rows\n", name, tid, r);
        // the kernel loads one eviction-log entry per column and uses it for every row
        EXPECT(get<1>(rc(r, c)) == get<1>(rc(0, c)), "%s: tid %d column %d differs between rows\n", name, tid, c);
        cols_of_row[row][get<1>(rc(r, c))] += 1;
      }
    }

    // P as the A operand of P V: (MMA, MMA_M, MMA_K) must address the same (row, key) elements.
    Tensor asA = make_tensor(tScS.data(), acc_as_a_operand(tScS.layout()));
    Tensor tPcA = thr.partition_A(make_identity_tensor(Shape<Int<M>, Int<N>>{}));  // K of P V = keys
    EXPECT(size(asA) == size(tPcA), "%s: P has %d registers, the A fragment %d\n", name, int(size(asA)),
           int(size(tPcA)));
    EXPECT(size<1>(asA) == size<1>(tPcA) && size<2>(asA) == size<2>(tPcA), "%s: P view and A fragment shapes differ\n",
           name);
    for (int m = 0; m < size<1>(asA); ++m)
      for (int k = 0; k < size<2>(asA); ++k)
        for (int v = 0; v < size<0>(asA); ++v) {
          auto got = asA(v, m, k);
          auto want = tPcA(v, m, k);
          EXPECT(get<0>(got) == get<0>(want) && get<1>(got) == get<1>(want),
                 "%s: tid %d P register (%d,%d,%d) holds (%d,%d), the MMA expects (%d,%d)\n", name, tid, v, m, k,
                 int(get<0>(got)), int(get<1>(got)), int(get<0>(want)), int(get<1>(want)));
        }

    // as_a_operand (what the kernels call) moves each register to where that view says.
    Tensor acc = partition_fragment_C(mma, Shape<Int<M>, Int<N>>{});
    for (int i = 0; i < size(acc); ++i) acc(i) = float(i);
    Tensor a = shadowkv::cuda_cute::as_a_operand<float>(acc);
    for (int i = 0; i < size(a); ++i) {
      const int from = int(a(i));
      EXPECT(get<0>(tScS(from)) == get<0>(tPcA(i)) && get<1>(tScS(from)) == get<1>(tPcA(i)),
             "%s: tid %d as_a_operand register %d holds score register %d at the wrong place\n", name, tid, i, from);
    }

    Tensor tOcO = thr.partition_C(make_identity_tensor(Shape<Int<M>, Int<D>>{}));
    check_output_rows(name, tid, tOcO, make_tensor(tOcO.data(), acc_rowcol(tOcO.layout())), rc, out_cover);
  }
  check_cover(name, cols_of_row, out_cover);
  // The four lanes of a quad (the row reductions' xor 1 and xor 2) share the rows.
  for (int tid = 0; tid < Tr::kThreads; ++tid) {
    auto row_of = [&](int t, int r) {
      Tensor tScS = mma.get_thread_slice(t).partition_C(make_identity_tensor(Shape<Int<M>, Int<N>>{}));
      Tensor rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));
      return int(get<0>(rc(r, 0)));
    };
    for (int r = 0; r < 2; ++r) {
      EXPECT(row_of(tid, r) == row_of(tid ^ 1, r) && row_of(tid, r) == row_of(tid ^ 2, r),
             "%s: tid %d row %d not shared by its quad\n", name, tid, r);
    }
  }
  std::printf("%s: %s\n", name, failures == 0 ? "ok" : "FAILED");
}

// The backward's double-buffered partner tiles (PartnerStages): the four tiles cover the
// staging buffer exactly once, and each one's transposed view addresses the tile's own elements.
template <typename Tr>
void check_stages(const char* name) {
  using E = typename Tr::Element;
  constexpr int N = Tr::kBlockN, D = Tr::kHeadDim;
  // On 1024 bytes, as in the kernels: the wgmma layouts swizzle address bits, not offsets.
  struct alignas(1024) Block {
    unsigned char bytes[1024];
  };
  static_assert(4 * N * D * sizeof(E) % sizeof(Block) == 0, "whole swizzle periods");
  std::vector<Block> storage(4 * N * D * sizeof(E) / sizeof(Block));
  const struct {
    E* p;
    size_t n;
    E* data() const { return p; }
    size_t size() const { return n; }
  } buf{reinterpret_cast<E*>(storage.data()), size_t(4 * N * D)};
  const shadowkv::cuda_cute::PartnerStages<Tr> stages(buf.data());
  std::vector<int> hits(buf.size(), 0);
  for (int stage = 0; stage < 2; ++stage)
    for (int j = 0; j < 2; ++j) {
      Tensor tile = stages.tile(stage, j);
      Tensor t = stages.transposed(tile);
      for (int n = 0; n < N; ++n)
        for (int d = 0; d < D; ++d) {
          const E* at = &tile(n, d);
          const long off = long(at - buf.data());
          EXPECT(off >= 0 && off < long(buf.size()), "%s: stage %d tile %d (%d,%d) outside the buffer\n", name, stage,
                 j, n, d);
          if (off >= 0 && off < long(buf.size())) ++hits[off];
          EXPECT(off / (N * D) == 2 * stage + j, "%s: stage %d tile %d (%d,%d) in another tile's slot\n", name, stage,
                 j, n, d);
          EXPECT(&t(d, n) == at, "%s: stage %d tile %d transposed (%d,%d) is another element\n", name, stage, j, d, n);
        }
    }
  for (size_t i = 0; i < hits.size(); ++i) EXPECT(hits[i] == 1, "%s: buffer element %zu used %d times\n", name, i, hits[i]);
  std::printf("%s stages: %s\n", name, failures == 0 ? "ok" : "FAILED");
}

// The sm_90a kernels (shadow_attention_wgmma.cuh): the same register maps for the wgmma
// accumulators (scores 64 x BN, output 64 x D per warpgroup; one or two warpgroups stacked
// along the rows) and for P reused as the register A operand of the O += P V wgmma; and the
// shared-memory operands each warpgroup's descriptors cover: its own 64 rows of the own tile
// (every column), the whole partner tile.
template <typename Tr>
void check_wgmma(const char* name) {
  namespace W = shadowkv::cuda_wgmma;
  constexpr int M = Tr::kBlockM, N = Tr::kBlockN, D = Tr::kHeadDim;
  typename Tr::TiledMmaS mma_s;
  typename Tr::TiledMmaO mma_o;
  static_assert(decltype(size(mma_s))::value == Tr::kThreads && decltype(size(mma_o))::value == Tr::kThreads,
                "one MMA thread per block thread");
  static_assert(M == 64 * Tr::kWarpgroups && Tr::kThreads == 128 * Tr::kWarpgroups, "64 rows per warpgroup");
  std::vector<std::vector<int>> score_cover(M, std::vector<int>(N, 0)), out_cover(M, std::vector<int>(D, 0));
  auto rows_of = [&](int tid) {
    Tensor tScS = mma_s.get_thread_slice(tid).partition_C(make_identity_tensor(Shape<Int<M>, Int<N>>{}));
    Tensor rc = make_tensor(tScS.data(), W::acc_rowcol(tScS.layout()));
    std::vector<int> rows;
    for (int r = 0; r < size<0>(rc); ++r) rows.push_back(int(get<0>(rc(r, 0))));
    return rows;
  };
  for (int tid = 0; tid < Tr::kThreads; ++tid) {
    const int warp = tid / 32, lane = tid % 32;
    Tensor tScS = mma_s.get_thread_slice(tid).partition_C(make_identity_tensor(Shape<Int<M>, Int<N>>{}));
    Tensor rc = make_tensor(tScS.data(), W::acc_rowcol(tScS.layout()));
    EXPECT(size<0>(rc) == 2, "%s: tid %d has %d score rows, expected 2\n", name, tid, int(size<0>(rc)));
    for (int r = 0; r < size<0>(rc); ++r) {
      const int row = get<0>(rc(r, 0));
      EXPECT(row / 16 == warp && row % 8 == lane / 4, "%s: tid %d row-view row %d is query row %d\n", name, tid, r,
             row);
      for (int c = 0; c < size<1>(rc); ++c) {
        EXPECT(get<0>(rc(r, c)) == row, "%s: tid %d row-view row %d mixes query rows\n", name, tid, r);
        EXPECT(get<1>(rc(r, c)) == get<1>(rc(0, c)), "%s: tid %d column %d differs between rows\n", name, tid, c);
        score_cover[row][get<1>(rc(r, c))] += 1;
      }
    }
    const std::vector<int> mine = rows_of(tid);
    EXPECT(mine == rows_of(tid ^ 1) && mine == rows_of(tid ^ 2), "%s: tid %d rows not shared by its quad\n", name,
           tid);

    // The shared-memory operands of S = Q K^T as this thread's warpgroup issues them: the A
    // view is the warpgroup's 64 rows of the own tile, the B view the whole partner tile.
    {
      const int wg = tid / 128;
      auto thr_s = mma_s.get_thread_slice(tid);
      Tensor tQcA = thr_s.partition_A(make_identity_tensor(Shape<Int<M>, Int<D>>{}));
      std::set<std::pair<int, int>> a_seen;
      for (int i = 0; i < size(tQcA); ++i) {
        const int row = get<0>(tQcA(i)), col = get<1>(tQcA(i));
        EXPECT(row / 64 == wg, "%s: tid %d (warpgroup %d) A operand reads own row %d\n", name, tid, wg, row);
        a_seen.emplace(row, col);
      }
      EXPECT(int(a_seen.size()) == 64 * D, "%s: tid %d A operand covers %d of its 64 x %d elements\n", name, tid,
             int(a_seen.size()), D);
      Tensor tKcB = thr_s.partition_B(make_identity_tensor(Shape<Int<N>, Int<D>>{}));
      std::set<std::pair<int, int>> b_seen;
      for (int i = 0; i < size(tKcB); ++i) b_seen.emplace(int(get<0>(tKcB(i))), int(get<1>(tKcB(i))));
      EXPECT(int(b_seen.size()) == N * D, "%s: tid %d B operand covers %d of the %d x %d partner tile\n", name, tid,
             int(b_seen.size()), N, D);
    }

    // P as the register A operand of O += P V.
    auto thr_o = mma_o.get_thread_slice(tid);
    Tensor asA = make_tensor(tScS.data(), W::acc_as_a_operand(tScS.layout()));
    Tensor tPcA = thr_o.partition_A(make_identity_tensor(Shape<Int<M>, Int<N>>{}));
    Tensor fragA = thr_o.partition_fragment_A(make_tensor<typename Tr::Element>(Shape<Int<M>, Int<N>>{}));
    EXPECT(size(asA) == size(tPcA) && rank(asA) == rank(tPcA) && size<1>(asA) == size<1>(tPcA) &&
               size<2>(asA) == size<2>(tPcA) && size<0>(asA) == size<0>(tPcA),
           "%s: P view and A fragment shapes differ\n", name);
    EXPECT(size(fragA) == size(tPcA), "%s: the A register fragment has %d registers, P %d\n", name,
           int(size(fragA)), int(size(tPcA)));
    for (int i = 0; i < size(tPcA); ++i) {
      auto got = asA(i);
      auto want = tPcA(i);
      EXPECT(get<0>(got) == get<0>(want) && get<1>(got) == get<1>(want),
             "%s: tid %d P register %d holds (%d,%d), the wgmma expects (%d,%d)\n", name, tid, i, int(get<0>(got)),
             int(get<1>(got)), int(get<0>(want)), int(get<1>(want)));
    }
    Tensor acc = partition_fragment_C(mma_s, Shape<Int<M>, Int<N>>{});
    for (int i = 0; i < size(acc); ++i) acc(i) = float(i);
    Tensor a = W::as_a_operand<float>(acc);
    for (int i = 0; i < size(a); ++i) {
      const int from = int(a(i));
      EXPECT(get<0>(tScS(from)) == get<0>(tPcA(i)) && get<1>(tScS(from)) == get<1>(tPcA(i)),
             "%s: tid %d as_a_operand register %d holds score register %d at the wrong place\n", name, tid, i, from);
    }

    // The output: each (row, d) once, with the rows of this thread's softmax state.
    Tensor tOcO = thr_o.partition_C(make_identity_tensor(Shape<Int<M>, Int<D>>{}));
    check_output_rows(name, tid, tOcO, make_tensor(tOcO.data(), W::acc_rowcol(tOcO.layout())), rc, out_cover);
  }
  check_cover(name, score_cover, out_cover);
  // The transposed view of V addresses the tile's own elements.
  auto kv = typename Tr::SmemLayoutPartner{}.layout_b();
  auto vt = typename Tr::SmemLayoutPartnerT{}.layout_b();
  for (int j = 0; j < N; ++j)
    for (int d = 0; d < D; ++d)
      EXPECT(vt(d, j) == kv(j, d), "%s: V^T view (%d,%d) -> %d, tile (%d,%d) -> %d\n", name, d, j, int(vt(d, j)), j,
             d, int(kv(j, d)));
  std::printf("%s (wgmma): %s\n", name, failures == 0 ? "ok" : "FAILED");
}

// The global -> shared copy of the wgmma traits (GmemTiledCopy: kThreads / 8 rows of 8 threads,
// 8 elements each) over every tile shape a kernel copies with it: each element of the tile is
// copied exactly once, and each copy slice (_, m, _) of a thread lies in one row, since
// copy_rows_if decides per slice from its first coordinate whether the row is loaded or zeroed.
template <typename Tr, int Rows>
void check_gmem_copy(const char* name) {
  constexpr int D = Tr::kHeadDim;
  typename Tr::GmemTiledCopy gmem_copy;
  std::vector<std::vector<int>> hits(Rows, std::vector<int>(D, 0));
  for (int tid = 0; tid < Tr::kThreads; ++tid) {
    Tensor c = gmem_copy.get_thread_slice(tid).partition_S(make_identity_tensor(Shape<Int<Rows>, Int<D>>{}));
    for (int m = 0; m < size<1>(c); ++m) {
      const int row = int(get<0>(c(0, m, 0)));
      for (int v = 0; v < size<0>(c); ++v)
        for (int k = 0; k < size<2>(c); ++k) {
          const int r = int(get<0>(c(v, m, k))), d = int(get<1>(c(v, m, k)));
          EXPECT(r == row, "%s: tid %d copy slice %d spans rows %d and %d\n", name, tid, m, row, r);
          if (r >= 0 && r < Rows && d >= 0 && d < D) ++hits[r][d];
        }
    }
  }
  for (int r = 0; r < Rows; ++r)
    for (int d = 0; d < D; ++d)
      EXPECT(hits[r][d] == 1, "%s: tile element (%d,%d) copied %d times\n", name, r, d, hits[r][d]);
  std::printf("%s gmem copy %dx%d: %s\n", name, Rows, D, failures == 0 ? "ok" : "FAILED");
}

// The wgmma kernels' checks (test_cute_layouts_wgmma.cu).
void check_wgmma_layouts();
