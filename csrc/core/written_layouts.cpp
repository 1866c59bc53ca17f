// check_written_layouts (paged_kv.h, shadow_attention.h): the arrays an op writes must give every
// element its own memory. Why: the C++ API takes raw pointers and strides (defaulting to 0), and an array
// whose strides fold elements onto each other is written through twice: one sequence's keys
// overwrite another's, or two threads race on a length, while every value check passes. The
// torch ops check this on the tensors; this is the same promise for callers of the C++ API.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "shadowkv/paged_kv.h"
#include "shadowkv/shadow_attention.h"

namespace shadowkv {
namespace {

struct Dim {
  int64_t size, stride;  // stride in elements
};

std::string list(const std::vector<Dim>& dims, bool sizes) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes ? dims[i].size : dims[i].stride);
  return s + "]";
}

// The furthest element offset from element 0 that any index reaches (saturating): the sum over
// dimensions of |stride| * (size - 1).
uint64_t furthest_offset(const std::vector<Dim>& dims) {
  constexpr uint64_t kMax = std::numeric_limits<uint64_t>::max();
  uint64_t reach = 0;
  for (const Dim& d : dims) {
    if (d.size <= 1) continue;
    const uint64_t stride = d.stride < 0 ? 0 - static_cast<uint64_t>(d.stride) : static_cast<uint64_t>(d.stride);
    const uint64_t span = static_cast<uint64_t>(d.size - 1);
    reach = (stride != 0 && span > (kMax - reach) / stride) ? kMax : reach + stride * span;
  }
  return reach;
}

// Sufficient for no two indices to share an element: ordered by |stride|, each dimension of size
// > 1 steps past the furthest element the smaller ones reach. (Exotic interleavings that also
// never collide are refused; no cache layout needs them.) Empty arrays have no element.
bool elements_distinct(const std::vector<Dim>& dims) {
  std::vector<std::pair<uint64_t, int64_t>> steps;  // (|stride|, size)
  for (const Dim& d : dims) {
    if (d.size == 0) return true;
    if (d.size > 1) steps.emplace_back(d.stride < 0 ? 0 - static_cast<uint64_t>(d.stride) : d.stride, d.size);
  }
  std::sort(steps.begin(), steps.end());
  uint64_t reach = 0;  // the furthest element offset the dimensions so far reach (saturating)
  constexpr uint64_t kMax = std::numeric_limits<uint64_t>::max();
  for (const auto& [stride, size] : steps) {
    if (stride <= reach) return false;  // also a zero stride
    const uint64_t span = static_cast<uint64_t>(size - 1);
    reach = stride > (kMax - reach) / span ? kMax : reach + stride * span;
  }
  return true;
}

// Element offsets are int64 in the kernels, and so are the byte offsets they become (up to 8
// bytes an element): a stride of 2^62 once wrapped to offset 0 and wrote page 1 over page 0,
// every distinctness check passed. No real allocation comes near this bound.
constexpr uint64_t kMaxElementOffset = static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) / 8;

void check(const char* op, const char* name, const char* layout, const std::vector<Dim>& dims) {
  // An element count past int64 is refused first: the kernels' offset arithmetic would
  // overflow (undefined behaviour) before any allocation could fail. Empty arrays have none.
  std::vector<int64_t> sizes;
  for (const Dim& d : dims) {
    if (d.size < 0) throw std::invalid_argument(std::string(op) + ": `" + name + "` " + layout + " has a negative size");
    sizes.push_back(d.size);
  }
  const bool empty = std::find(sizes.begin(), sizes.end(), 0) != sizes.end();
  if (!empty && !product_fits_int64(sizes))
    throw std::invalid_argument(std::string(op) + ": `" + name + "` " + layout + " of shape " + list(dims, true) +
                                " is too large: its element count overflows int64");
  if (empty) return;
  if (furthest_offset(dims) > kMaxElementOffset)
    throw std::invalid_argument(std::string(op) + ": `" + name + "` " + layout + " of shape " + list(dims, true) +
                                " has element strides " + list(dims, false) +
                                " that reach past int64 byte offsets (an element offset of 2^60 or more)");
  if (elements_distinct(dims)) return;
  throw std::invalid_argument(std::string(op) + ": `" + name + "` " + layout + " of shape " + list(dims, true) +
                              " has element strides " + list(dims, false) +
                              " that put two elements in the same memory; the op writes it, so each element "
                              "needs its own");
}

void check_pages(const PagedKVCache& c, const char* op) {
  const int64_t P = c.num_pages, ps = c.page_size, H = c.num_kv_heads, D = c.head_dim;
  check(op, "k_pages", "[P, page_size, Hkv, D]", {{P, c.k_stride[0]}, {ps, c.k_stride[1]}, {H, c.k_stride[2]}, {D, 1}});
  check(op, "v_pages", "[P, page_size, Hkv, D]", {{P, c.v_stride[0]}, {ps, c.v_stride[1]}, {H, c.v_stride[2]}, {D, 1}});
  check(op, "pos_pages", "[P, page_size, Hkv]", {{P, c.pos_stride[0]}, {ps, c.pos_stride[1]}, {H, c.pos_stride[2]}});
  check(op, "seq_lens", "[B]", {{c.batch, c.seq_lens_stride}});
}

}  // namespace

void check_written_layouts(const AppendKVParams& p, const char* op) { check_pages(p.cache, op); }

void check_written_layouts(const PagedDecodeParams& p, const char* op) {
  const PagedKVCache& c = p.cache;
  check(op, "out", "[B, Hq, D]", {{c.batch, p.o_stride[0]}, {p.num_q_heads, p.o_stride[1]}, {c.head_dim, 1}});
  if (p.scores) {
    check(op, "scores_out", "[B, Hkv, S]",
          {{c.batch, p.scores_stride[0]}, {c.num_kv_heads, p.scores_stride[1]}, {p.scores_len, p.scores_stride[2]}});
  }
}

void check_written_layouts(const EvictCompactParams& p, const char* op) {
  const PagedKVCache& c = p.cache;
  check_pages(c, op);
  check(op, "block_tables", "[B, max_pages]", {{c.batch, c.bt_stride[0]}, {c.max_pages, c.bt_stride[1]}});
  check(op, "evicted_at", "[B, Hkv, T]",
        {{c.batch, p.ev_stride[0]}, {c.num_kv_heads, p.ev_stride[1]}, {p.log_len, p.ev_stride[2]}});
  if (p.slot_scores) {
    check(op, "slot_scores", "[B, Hkv, S]",
          {{c.batch, p.scores_stride[0]}, {c.num_kv_heads, p.scores_stride[1]}, {p.keep_len, p.scores_stride[2]}});
  }
  check(op, "freed", "[B, max_pages]", {{c.batch, p.freed_stride[0]}, {c.max_pages, p.freed_stride[1]}});
}

void check_written_layouts(const ShadowAttentionParams& p, const char* op) {
  const int64_t B = p.batch, H = p.num_q_heads, L = p.q_len, D = p.head_dim;
  check(op, "out", "[B, Hq, Lq, D]", {{B, p.o_stride[0]}, {H, p.o_stride[1]}, {L, p.o_stride[2]}, {D, 1}});
  check(op, "lse", "[B, Hq, Lq]", {{B, p.lse_stride[0]}, {H, p.lse_stride[1]}, {L, 1}});
}

void check_written_layouts(const ShadowAttentionBwdParams& bp, const char* op) {
  const ShadowAttentionParams& p = bp.fwd;
  const int64_t B = p.batch, Hq = p.num_q_heads, Hkv = p.num_kv_heads, D = p.head_dim;
  check(op, "grad_q", "[B, Hq, Lq, D]",
        {{B, bp.dq_stride[0]}, {Hq, bp.dq_stride[1]}, {p.q_len, bp.dq_stride[2]}, {D, 1}});
  check(op, "grad_k", "[B, Hkv, Lk, D]",
        {{B, bp.dk_stride[0]}, {Hkv, bp.dk_stride[1]}, {p.kv_len, bp.dk_stride[2]}, {D, 1}});
  check(op, "grad_v", "[B, Hkv, Lk, D]",
        {{B, bp.dv_stride[0]}, {Hkv, bp.dv_stride[1]}, {p.kv_len, bp.dv_stride[2]}, {D, 1}});
}

}  // namespace shadowkv
