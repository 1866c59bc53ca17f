// Host-only checks of the tile walk every CUDA shadow-attention kernel shares
// (csrc/cuda/shadow_attention_common.cuh), against brute force over the shadow mask, on random
// shapes and eviction logs, without a GPU. A mistake there skips keys a query sees (a wrong
// answer) or computes a block without its per-element mask (a wrong answer again), and no CPU
// test would notice: the CPU kernels walk their tiles with their own code.
//   * query tiles (forward, dQ): the grid covers every (batch, head, row) once; a key tile
//     classified skip holds no visible pair of the tile's rows, one classified full has every
//     pair visible; no key past the last tile a block visits is visible to it; the K/V rows a
//     tile stages (kv_row_needed) are exactly the keys some row sees;
//   * key tiles (dK/dV): the grid covers every key once; [i_begin, i_end) holds every query that
//     sees a key of the tile; the (head, query tile) steps cover that range once per head of the
//     GQA group; a step flagged full has every pair visible; the own K/V rows staged
//     (own_kv_row_needed) are exactly the keys some query sees.
// Built by nvcc as plain host code; returns non-zero on failure.
#include <climits>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "shadow_attention_common.cuh"

using namespace shadowkv;
using namespace shadowkv::cuda_attn;

static int failures = 0;
static long checks = 0;

#define EXPECT(cond, ...)                          \
  do {                                             \
    ++checks;                                      \
    if (!(cond)) {                                 \
      if (failures < 20) std::printf(__VA_ARGS__); \
      ++failures;                                  \
    }                                              \
  } while (0)

struct Rng {
  uint64_t s;
  uint64_t next() {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return s;
  }
  int64_t below(int64_t n) { return n <= 0 ? 0 : static_cast<int64_t>(next() % static_cast<uint64_t>(n)); }
};

// One (batch, kv head)'s log and the number of visible pairs in every rectangle of the
// (query row, key) plane, from 2-D prefix sums.
struct Plane {
  int64_t q_len, kv_len, q_offset;
  std::vector<int32_t> ev;
  std::vector<int64_t> pre;  // (q_len + 1) x (kv_len + 1)
  Plane(std::vector<int32_t> log, int64_t lq, int64_t q_offset_)
      : q_len(lq), kv_len(static_cast<int64_t>(log.size())), q_offset(q_offset_), ev(std::move(log)),
        pre((lq + 1) * (kv_len + 1), 0) {
    for (int64_t i = 0; i < q_len; ++i)
      for (int64_t j = 0; j < kv_len; ++j)
        pre[(i + 1) * (kv_len + 1) + j + 1] = visible(j, q_offset + i, ev[j]) + pre[i * (kv_len + 1) + j + 1] +
                                              pre[(i + 1) * (kv_len + 1) + j] - pre[i * (kv_len + 1) + j];
  }
  // Visible pairs among rows [i0, i1) x keys [j0, j1), both clipped to the plane.
  int64_t count(int64_t i0, int64_t i1, int64_t j0, int64_t j1) const {
    i1 = i1 < q_len ? i1 : q_len;
    j1 = j1 < kv_len ? j1 : kv_len;
    if (i0 >= i1 || j0 >= j1) return 0;
    const int64_t w = kv_len + 1;
    return pre[i1 * w + j1] - pre[i0 * w + j1] - pre[i1 * w + j0] + pre[i0 * w + j0];
  }
};

// The logs the tests draw: random (incl. keys evicted before they exist and never evicted),
// StreamingLLM (sinks + window, evicting every few steps), nothing evicted, all but sinks.
std::vector<int32_t> draw_log(Rng& rng, int64_t kv_len, int64_t horizon) {
  std::vector<int32_t> ev(kv_len);
  const int kind = static_cast<int>(rng.below(4));
  const int64_t sinks = rng.below(5), window = 1 + rng.below(96), every = 1 + rng.below(8);
  for (int64_t j = 0; j < kv_len; ++j) {
    switch (kind) {
      case 0: {
        const int64_t r = rng.below(10);
        ev[j] = r == 0 ? INT32_MAX : r == 1 ? static_cast<int32_t>(rng.below(j + 1)) : static_cast<int32_t>(j + 1 + rng.below(horizon));
        break;
      }
      case 1: ev[j] = j < sinks ? INT32_MAX : static_cast<int32_t>(((j + window) + every - 1) / every * every); break;
      case 2: ev[j] = INT32_MAX; break;
      default: ev[j] = j < sinks ? INT32_MAX : static_cast<int32_t>(j + 1); break;
    }
  }
  return ev;
}

// ev_minmax_kernel's output for one row: (min, max) of evicted_at per kEvTile keys.
std::vector<int2> ev_minmax(const std::vector<int32_t>& ev) {
  const int64_t n = (static_cast<int64_t>(ev.size()) + kEvTile - 1) / kEvTile;
  std::vector<int2> mm(n, make_int2(INT_MAX, INT_MIN));
  for (size_t j = 0; j < ev.size(); ++j) {
    int2& m = mm[j / kEvTile];
    m.x = ev[j] < m.x ? ev[j] : m.x;
    m.y = ev[j] > m.y ? ev[j] : m.y;
  }
  return mm;
}

void check_query_tiles(const ShadowAttentionParams& p, const std::vector<Plane>& planes,
                       const std::vector<int2>& mm_all, int64_t n_ev, int BM, int BN, const char* what) {
  const int64_t n_q_tiles = (p.q_len + BM - 1) / BM;
  std::vector<int> seen(p.batch * p.num_q_heads * p.q_len, 0);
  for (int64_t bid = 0; bid < p.batch * p.num_q_heads * n_q_tiles; ++bid) {
    const QueryTile t = query_tile_of(p, BM, bid);
    EXPECT(t.rows >= 1 && t.rows <= BM && t.i0 + t.rows <= p.q_len, "%s: block %ld has rows %d at %ld\n", what,
           long(bid), t.rows, long(t.i0));
    EXPECT(t.hkv == t.hq / (p.num_q_heads / p.num_kv_heads), "%s: block %ld reads kv head %ld\n", what, long(bid),
           long(t.hkv));
    for (int r = 0; r < t.rows; ++r) ++seen[(t.b * p.num_q_heads + t.hq) * p.q_len + t.i0 + r];
    const Plane& pl = planes[t.b * p.num_kv_heads + t.hkv];
    const int2* mm = mm_all.data() + (t.b * p.num_kv_heads + t.hkv) * n_ev;
    const int32_t* evg = pl.ev.data();
    const int64_t n_key_tiles = ((p.kv_len < t.p1 + 1 ? p.kv_len : t.p1 + 1) + BN - 1) / BN;
    for (int64_t tile = 0; tile * BN < p.kv_len; ++tile) {
      const int64_t k0 = tile * BN;
      const int64_t cols = (k0 + BN <= p.kv_len ? BN : p.kv_len - k0);
      const int64_t vis = pl.count(t.i0, t.i0 + t.rows, k0, k0 + BN);
      if (tile >= n_key_tiles) {
        EXPECT(vis == 0, "%s: block %ld stops before key tile %ld, which it sees\n", what, long(bid), long(tile));
        continue;
      }
      const TileKind kind = classify_key_tile(key_tile_ev_range(mm, n_ev, k0, BN), k0, BN, p.kv_len, t.p0, t.p1);
      if (kind == TileKind::kSkip) {
        EXPECT(vis == 0, "%s: block %ld skips key tile %ld with %ld visible pairs\n", what, long(bid), long(tile),
               long(vis));
        continue;
      }
      if (kind == TileKind::kFull) {
        EXPECT(cols == BN && vis == int64_t{t.rows} * BN,
               "%s: block %ld takes key tile %ld as full, %ld of %ld pairs visible\n", what, long(bid), long(tile),
               long(vis), long(int64_t{t.rows} * cols));
      }
      for (int row = 0; row < BN; ++row) {
        const bool needed = kv_row_needed(row, k0, p, t, kind, evg);
        const int64_t j = k0 + row;
        const bool seen = j < p.kv_len && pl.count(t.i0, t.i0 + t.rows, j, j + 1) > 0;
        EXPECT(needed == seen, "%s: block %ld %s the K/V row of key %ld, which it %s\n", what, long(bid),
               needed ? "stages" : "zeroes", long(j), seen ? "sees" : "does not see");
      }
    }
  }
  for (size_t i = 0; i < seen.size(); ++i)
    EXPECT(seen[i] == 1, "%s: query row %zu is in %d blocks\n", what, i, seen[i]);
}

void check_key_tiles(const ShadowAttentionParams& p, const std::vector<Plane>& planes, const std::vector<int2>& mm_all,
                     int64_t n_ev, int BM, int BN, const char* what) {
  const int64_t n_k_tiles = (p.kv_len + BM - 1) / BM;
  const int64_t group = p.num_q_heads / p.num_kv_heads;
  std::vector<int> seen(p.batch * p.num_kv_heads * p.kv_len, 0);
  for (int64_t bid = 0; bid < p.batch * p.num_kv_heads * n_k_tiles; ++bid) {
    const KeyTile kt = key_tile_of(p, BM, mm_all.data(), n_ev, bid);
    EXPECT(kt.rows >= 1 && kt.rows <= BM && kt.k0 + kt.rows <= p.kv_len, "%s: key block %ld has rows %d at %ld\n",
           what, long(bid), kt.rows, long(kt.k0));
    for (int r = 0; r < kt.rows; ++r) ++seen[(kt.b * p.num_kv_heads + kt.hkv) * p.kv_len + kt.k0 + r];
    const Plane& pl = planes[kt.b * p.num_kv_heads + kt.hkv];
    const int32_t* evg = pl.ev.data();
    for (int row = 0; row < BM; ++row) {
      const bool needed = own_kv_row_needed(row, p, kt, evg);
      const bool seen_by_query = row < kt.rows && pl.count(0, p.q_len, kt.k0 + row, kt.k0 + row + 1) > 0;
      EXPECT(needed == seen_by_query, "%s: key block %ld %s its K/V row %d, which %s query sees\n", what, long(bid),
             needed ? "stages" : "zeroes", row, seen_by_query ? "some" : "no");
    }
    for (int64_t i = 0; i < p.q_len; ++i) {
      if (pl.count(i, i + 1, kt.k0, kt.k0 + kt.rows) > 0) {
        EXPECT(kt.i_begin <= i && i < kt.i_end, "%s: key block %ld leaves out query %ld (range [%ld, %ld))\n", what,
               long(bid), long(i), long(kt.i_begin), long(kt.i_end));
      }
    }
    // The steps: each head of the group once, each query of [i_begin, i_end) once per head.
    const HeadQuerySteps steps(p, kt, BN);
    std::vector<int> covered(group * p.q_len, 0);
    int n_steps = 0;
    for (auto st = steps.first(); !steps.done(st) && n_steps < 100000; st = steps.after(st), ++n_steps) {
      EXPECT(st.hq >= kt.hkv * group && st.hq < (kt.hkv + 1) * group && st.i0 >= 0 && st.i0 < p.q_len,
             "%s: key block %ld steps to head %ld rows %ld\n", what, long(bid), long(st.hq), long(st.i0));
      if (!(st.hq >= kt.hkv * group && st.hq < (kt.hkv + 1) * group && st.i0 >= 0 && st.i0 < p.q_len)) break;
      const QueryRows qr = query_rows(p, kt, BM, st.i0, BN);
      EXPECT(qr.rows >= 1 && qr.rows <= BN && qr.p0 == p.q_offset + st.i0, "%s: step rows %d p0 %ld\n", what, qr.rows,
             long(qr.p0));
      for (int r = 0; r < qr.rows; ++r) ++covered[(st.hq - kt.hkv * group) * p.q_len + st.i0 + r];
      if (qr.full) {
        const int64_t vis = pl.count(st.i0, st.i0 + qr.rows, kt.k0, kt.k0 + BM);
        EXPECT(kt.rows == BM && vis == int64_t{qr.rows} * BM,
               "%s: key block %ld takes query rows %ld.. as full, %ld of %ld pairs visible\n", what, long(bid),
               long(st.i0), long(vis), long(int64_t{qr.rows} * kt.rows));
      }
    }
    EXPECT(n_steps < 100000, "%s: key block %ld does not stop stepping\n", what, long(bid));
    for (int64_t h = 0; h < group; ++h)
      for (int64_t i = 0; i < p.q_len; ++i) {
        const bool in = kt.i_begin <= i && i < kt.i_end;
        const int c = covered[h * p.q_len + i];
        EXPECT(c == (in ? 1 : 0) || (!in && c == 1 && i >= kt.i_begin),
               "%s: key block %ld visits head %ld query %ld %d times (range [%ld, %ld))\n", what, long(bid),
               long(kt.hkv * group + h), long(i), c, long(kt.i_begin), long(kt.i_end));
      }
  }
  for (size_t i = 0; i < seen.size(); ++i) EXPECT(seen[i] == 1, "%s: key %zu is in %d blocks\n", what, i, seen[i]);
}

int main() {
  Rng rng{0x9e3779b97f4a7c15ull};
  const int kCases = 2000;
  for (int c = 0; c < kCases; ++c) {
    ShadowAttentionParams p;
    p.batch = 1 + rng.below(2);
    p.num_kv_heads = 1 + rng.below(2);
    p.num_q_heads = p.num_kv_heads * (1 + rng.below(3));
    p.kv_len = rng.below(6) == 0 ? 1 + rng.below(8) : 1 + rng.below(260);
    // Training (all queries, q_offset 0), a chunk at the end, or a window anywhere.
    const int mode = static_cast<int>(rng.below(3));
    p.q_len = mode == 0 ? p.kv_len : 1 + rng.below(mode == 1 ? p.kv_len : 200);
    p.q_offset = mode == 0 ? 0 : mode == 1 ? p.kv_len - p.q_len : rng.below(300);
    p.ev_stride[1] = p.kv_len;
    p.ev_stride[0] = p.num_kv_heads * p.kv_len;
    std::vector<Plane> planes;
    std::vector<int2> mm_all;
    const int64_t n_ev = (p.kv_len + kEvTile - 1) / kEvTile;
    for (int64_t bh = 0; bh < p.batch * p.num_kv_heads; ++bh) {
      planes.emplace_back(draw_log(rng, p.kv_len, 300), p.q_len, p.q_offset);
      const std::vector<int2> mm = ev_minmax(planes.back().ev);
      mm_all.insert(mm_all.end(), mm.begin(), mm.end());
    }
    char what[96];
    for (int BN : {32, 64}) {
      std::snprintf(what, sizeof what, "case %d (B%ld Hq%ld Hkv%ld Lq%ld Lk%ld off%ld) BN %d", c, long(p.batch),
                    long(p.num_q_heads), long(p.num_kv_heads), long(p.q_len), long(p.kv_len), long(p.q_offset), BN);
      check_query_tiles(p, planes, mm_all, n_ev, 64, BN, what);
      check_key_tiles(p, planes, mm_all, n_ev, 64, BN, what);
    }
    // The SIMT kernels: 32 own rows against 32-key tiles, 16 above head_dim 192 (the dQ and
    // dK/dV kernels both).
    std::snprintf(what, sizeof what, "case %d simt", c);
    check_query_tiles(p, planes, mm_all, n_ev, 32, 32, what);
    check_query_tiles(p, planes, mm_all, n_ev, 16, 32, what);
    check_key_tiles(p, planes, mm_all, n_ev, 32, 32, what);
    check_key_tiles(p, planes, mm_all, n_ev, 16, 32, what);
  }
  std::printf("attention tiles: %d random cases, %ld checks: %s\n", kCases, checks, failures == 0 ? "ok" : "FAILED");
  return failures == 0 ? 0 : 1;
}
