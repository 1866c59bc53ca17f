#include "paged_kv_ops.h"

#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <functional>
#include <initializer_list>
#include <optional>
#include <stdexcept>
#include <utility>
#include <vector>

#include "device_launch.h"
#include "shadowkv/paged_kv.h"
#include "tensor_params.h"

namespace shadowkv::bindings {
namespace {

constexpr const char* kPagesLayout = "[P, page_size, Hkv, D]";

using Named = std::pair<const at::Tensor*, const char*>;

// Index and score tensors have one fixed dtype.
void check_dtype(const at::Tensor& t, const char* name, at::ScalarType expected) {
  TORCH_CHECK_TYPE(t.scalar_type() == expected, "shadowkv: `", name, "` must be ", dtype_str(expected), ", got ",
                   dtype_str(t.scalar_type()));
}

// The storage byte offsets of every byte of `t`, computed on the host from its sizes and strides
// alone (no device read, so it is safe inside CUDA graph capture).
at::Tensor byte_offsets(const at::Tensor& t) {
  const auto opts = at::TensorOptions().dtype(at::kLong);
  at::Tensor off = at::full({}, t.storage_offset(), opts);
  for (int64_t d = 0; d < t.dim(); ++d) {
    std::vector<int64_t> shape(t.dim(), 1);
    shape[d] = t.size(d);
    off = off + (at::arange(t.size(d), opts) * t.stride(d)).view(shape);
  }
  const int64_t es = static_cast<int64_t>(t.element_size());
  return (off.reshape({-1, 1}) * es + at::arange(es, opts)).reshape({-1});
}

// Whether any of the storage byte offsets `bytes` (int64, CPU) is a byte of `t`, from t's sizes
// and strides alone. Exact when t's moving dimensions, ordered by stride, each step past
// everything the smaller ones reach (any tensor without internal overlap, expanded dimensions
// aside): an offset then has one candidate index, taken greedily from the largest stride.
// Otherwise (a tensor whose elements interleave or repeat) it answers whether an offset falls
// within t's byte range: a refusal may then be conservative, never a miss.
bool bytes_hit(const at::Tensor& bytes, const at::Tensor& t) {
  const int64_t es = static_cast<int64_t>(t.element_size());
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride in bytes, size) of the moving dims
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) == 0) return false;
    if (t.size(d) > 1 && t.stride(d) != 0) dims.emplace_back(t.stride(d) * es, t.size(d));
  }
  std::sort(dims.begin(), dims.end());
  int64_t reach = es - 1;  // the last byte offset t covers, relative to its first
  bool exact = true;
  for (const auto& [stride, size] : dims) {
    exact = exact && stride > reach;
    reach += stride * (size - 1);
  }
  const at::Tensor rel = bytes - t.storage_offset() * es;
  at::Tensor hit = (rel >= 0) & (rel <= reach);
  if (exact) {
    at::Tensor rem = rel.clamp_min(0);
    for (auto it = dims.rbegin(); it != dims.rend(); ++it) {
      rem = rem - at::floor_divide(rem, it->first).clamp_max(it->second - 1) * it->first;
    }
    hit = hit & (rem < es);
  }
  return hit.any().item<bool>();
}

// Whether two views of one storage with the same element size and the same stride in every
// dimension where either moves (the k/v halves of a fused pool, or any two slices of one
// buffer) share a byte; nullopt when they are not such a pair or their strides are not nested.
// Element i of a and j of b overlap iff |(b0 - a0) - sum_d (i_d - j_d) S_d| < es (S_d in bytes,
// a0/b0 the first bytes). With nested strides (each one past everything the smaller ones
// reach) only floor(t / S_d) or the next value can leave a remainder the smaller dimensions
// reach, so a descent from the largest stride tries at most 2^rank candidates.
std::optional<bool> same_stride_views_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.dim() != b.dim() || a.element_size() != b.element_size()) return std::nullopt;
  const int64_t es = static_cast<int64_t>(a.element_size());
  struct Dim {
    int64_t stride, lo, hi;  // bytes; the range of i_d - j_d
  };
  std::vector<Dim> dims;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) == 1 && b.size(d) == 1) continue;
    if (a.stride(d) != b.stride(d) || a.stride(d) <= 0) return std::nullopt;
    dims.push_back({a.stride(d) * es, 1 - b.size(d), a.size(d) - 1});
  }
  std::sort(dims.begin(), dims.end(), [](const Dim& x, const Dim& y) { return x.stride < y.stride; });
  std::vector<int64_t> below(dims.size() + 1, es - 1);  // below[d]: what dims < d reach, + es - 1
  for (size_t d = 0; d < dims.size(); ++d) {
    if (dims[d].stride <= below[d]) return std::nullopt;  // not nested
    below[d + 1] = below[d] + dims[d].stride * std::max(-dims[d].lo, dims[d].hi);
  }
  const auto* base_a = static_cast<const char*>(a.data_ptr());
  const auto* base_b = static_cast<const char*>(b.data_ptr());
  std::function<bool(int64_t, int64_t)> reach = [&](int64_t t, int64_t d) {  // dims < d cover t?
    if (t < -below[d] || t > below[d]) return false;
    if (d == 0) return true;
    const Dim& dim = dims[d - 1];
    const int64_t q = t >= 0 ? t / dim.stride : -((-t + dim.stride - 1) / dim.stride);  // floor
    for (int64_t m : {q, q + 1}) {
      if (m >= dim.lo && m <= dim.hi && reach(t - m * dim.stride, d - 1)) return true;
    }
    return false;
  };
  return reach(base_b - base_a, static_cast<int64_t>(dims.size()));
}

// Whether two tensors that torch's quick test could not decide (same storage, TooHard) share a
// byte. Views with the same strides (the k/v halves of a fused pool) are compared exactly
// (same_stride_views_overlap); otherwise, when one is small (index tensors: a strided view of
// block_tables passed as seq_lens, or of a page pool's buffer), its bytes are tested against
// the other exactly (bytes_hit). Two large views with different strides are told apart only by
// their byte ranges: when those intersect the answer is Undecided, which the caller refuses (an
// exact test would enumerate millions of offsets; a kernel writing through an overlap it let
// pass would be silent corruption).
enum class Overlap { kNo, kYes, kUndecided };

Overlap strided_views_overlap(const at::Tensor& a, const at::Tensor& b) {
  constexpr int64_t kExactUpTo = int64_t{1} << 16;  // elements
  // (TooHard also comes back for any non-dense view, before torch compares the storages.)
  if (!a.storage().is_alias_of(b.storage()) || a.numel() == 0 || b.numel() == 0) return Overlap::kNo;
  if (const std::optional<bool> same = same_stride_views_overlap(a, b)) return *same ? Overlap::kYes : Overlap::kNo;
  const bool a_small = a.numel() <= b.numel();
  const at::Tensor& small = a_small ? a : b;
  if (small.numel() <= kExactUpTo) return bytes_hit(byte_offsets(small), a_small ? b : a) ? Overlap::kYes : Overlap::kNo;
  // Byte ranges [first, last] from the storage's start (torch strides are never negative).
  const auto range = [](const at::Tensor& t) {
    const int64_t es = static_cast<int64_t>(t.element_size());
    int64_t last = t.storage_offset() * es;
    for (int64_t d = 0; d < t.dim(); ++d) last += t.stride(d) * (t.size(d) - 1) * es;
    return std::pair{t.storage_offset() * es, last + es - 1};
  };
  const auto [a0, a1] = range(a);
  const auto [b0, b1] = range(b);
  return a1 < b0 || b1 < a0 ? Overlap::kNo : Overlap::kUndecided;
}

// The kernels write `written` in place: each must be a plain (non-broadcast) view, and none may
// share memory with another argument of the op.
void check_no_aliasing(std::initializer_list<Named> written, std::initializer_list<Named> all) {
  for (const auto& [t, name] : written) {
    TORCH_CHECK_VALUE(at::has_internal_overlap(*t) != at::MemOverlap::Yes, "shadowkv: `", name,
                      "` is written in place, so its elements must not overlap (got strides ",
                      shape_str(t->strides()), ", e.g. an expand()ed view); pass a materialized tensor");
    for (const auto& [u, other] : all) {
      if (t == u || !u->defined()) continue;
      const at::MemOverlapStatus s = at::get_overlap_status(*t, *u);
      const Overlap o = s == at::MemOverlapStatus::TooHard ? strided_views_overlap(*t, *u) : Overlap::kNo;
      TORCH_CHECK_VALUE(s != at::MemOverlapStatus::Full && s != at::MemOverlapStatus::Partial && o != Overlap::kYes,
                        "shadowkv: `", name, "` is written in place and must not share memory with `", other, "`");
      TORCH_CHECK_VALUE(o != Overlap::kUndecided, "shadowkv: `", name, "` is written in place and may share memory with `",
                        other, "`: they are large views of one buffer with different strides (", shape_str(t->strides()),
                        " and ", shape_str(u->strides()),
                        ") whose byte ranges intersect, which is not checked exactly; pass separate buffers, or views "
                        "with equal strides (such as the K/V halves of a fused pool)");
    }
  }
}

// Page rows are written in place, so they cannot be copied to a contiguous layout.
void check_unit_last_stride(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.size(-1) <= 1 || t.stride(-1) == 1, "shadowkv: `", name,
                    "` is written in place and needs a unit stride in its last dimension, got strides ",
                    shape_str(t.strides()));
}

// Runs the CPU kernel on CPU tensors and its CUDA twin (current stream, device guard) on CUDA
// tensors. The CUDA twins copy the index tensors they check to the host first (one stream
// synchronisation per call; see paged_kv.h).
template <typename Cpu, typename Cuda>
void run_kernel(const at::Device& device, const char* op, Cpu&& cpu, [[maybe_unused]] Cuda&& cuda) {
  if (device.is_cpu()) return rethrow_as_value_error(cpu);
#ifdef SHADOWKV_WITH_CUDA
  if (device.is_cuda()) return rethrow_as_value_error(cuda);
#endif
  TORCH_CHECK_NOT_IMPLEMENTED(false, "shadowkv: ", op, " has no kernel for tensors on ", device,
                              " in this build (python -m shadowkv info shows the build)");
}

// Checks the cache tensors (all on the device of `ref`, named ref_name) and describes them for
// the kernels. pos_pages may be null (decode does not read it). k_pages/v_pages need a unit
// last stride (callers that only read them pass last_dim_contiguous copies).
PagedKVCache make_cache(const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor* pos_pages,
                        const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& ref,
                        const char* ref_name) {
  check_rank(k_pages, 4, "k_pages", kPagesLayout);
  check_rank(v_pages, 4, "v_pages", kPagesLayout);
  if (pos_pages) check_rank(*pos_pages, 3, "pos_pages", "[P, page_size, Hkv]");
  check_rank(block_tables, 2, "block_tables", "[B, max_pages]");
  check_rank(seq_lens, 1, "seq_lens", "[B]");
  const DType dt = kernel_dtype(k_pages, "k_pages");
  check_same_dtype(v_pages, "v_pages", k_pages, "k_pages");
  if (pos_pages) check_dtype(*pos_pages, "pos_pages", at::kInt);
  check_dtype(block_tables, "block_tables", at::kInt);
  check_dtype(seq_lens, "seq_lens", at::kInt);
  for (const auto& [t, name] : {Named{&k_pages, "k_pages"}, Named{&v_pages, "v_pages"}, Named{pos_pages, "pos_pages"},
                                Named{&block_tables, "block_tables"}, Named{&seq_lens, "seq_lens"}}) {
    if (t && t != &ref) check_same_device(*t, name, ref, ref_name);
  }

  const int64_t P = k_pages.size(0), ps = k_pages.size(1), H = k_pages.size(2), D = k_pages.size(3);
  const int64_t B = block_tables.size(0), M = block_tables.size(1);
  TORCH_CHECK_VALUE(ps >= 1, "shadowkv: `k_pages` must have a page size (dim 1) >= 1, got shape ",
                    shape_str(k_pages.sizes()));
  TORCH_CHECK_VALUE(H >= 1, "shadowkv: `k_pages` must have >= 1 KV head (dim 2), got shape ",
                    shape_str(k_pages.sizes()));
  TORCH_CHECK_VALUE(D >= 1, "shadowkv: `k_pages` must have a head dim (dim 3) >= 1, got shape ",
                    shape_str(k_pages.sizes()));
  check_shape(v_pages, "v_pages", k_pages.sizes());
  if (pos_pages) check_shape(*pos_pages, "pos_pages", {P, ps, H});
  check_shape(seq_lens, "seq_lens", {B});

  PagedKVCache c;
  c.num_pages = P;
  c.page_size = ps;
  c.num_kv_heads = H;
  c.head_dim = D;
  c.batch = B;
  c.max_pages = M;
  c.dtype = dt;
  c.k_pages = k_pages.data_ptr();
  c.v_pages = v_pages.data_ptr();
  c.pos_pages = pos_pages ? pos_pages->data_ptr<int32_t>() : nullptr;
  c.block_tables = block_tables.data_ptr<int32_t>();
  c.seq_lens = seq_lens.data_ptr<int32_t>();
  copy_strides(k_pages, c.k_stride, 3);
  copy_strides(v_pages, c.v_stride, 3);
  if (pos_pages) copy_strides(*pos_pages, c.pos_stride, 3);
  copy_strides(block_tables, c.bt_stride, 2);
  c.seq_lens_stride = seq_lens.stride(0);
  return c;
}

}  // namespace

void append_kv(const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& pos_pages,
               const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& k_in,
               const at::Tensor& v_in, const at::Tensor& positions, const at::Tensor& num_new, bool check) {
  AppendKVParams p;
  p.cache = make_cache(k_pages, v_pages, &pos_pages, block_tables, seq_lens, k_pages, "k_pages");
  const PagedKVCache& c = p.cache;
  const at::Tensor k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  check_rank(k, 4, "k", "[B, Hkv, T, D]");
  check_rank(v, 4, "v", "[B, Hkv, T, D]");
  check_rank(positions, 2, "positions", "[B, T]");
  check_rank(num_new, 1, "num_new", "[B]");
  check_same_dtype(k, "k", k_pages, "k_pages");
  check_same_dtype(v, "v", k_pages, "k_pages");
  check_dtype(positions, "positions", at::kInt);
  check_dtype(num_new, "num_new", at::kInt);
  for (const auto& [t, name] : {Named{&k, "k"}, Named{&v, "v"}, Named{&positions, "positions"},
                                Named{&num_new, "num_new"}})
    check_same_device(*t, name, k_pages, "k_pages");
  const int64_t T = k.size(2);
  check_shape(k, "k", {c.batch, c.num_kv_heads, T, c.head_dim});
  check_shape(v, "v", k.sizes());
  check_shape(positions, "positions", {c.batch, T});
  check_shape(num_new, "num_new", {c.batch});
  check_unit_last_stride(k_pages, "k_pages");
  check_unit_last_stride(v_pages, "v_pages");
  check_no_aliasing({{&k_pages, "k_pages"}, {&v_pages, "v_pages"}, {&pos_pages, "pos_pages"}, {&seq_lens, "seq_lens"}},
                    {{&k_pages, "k_pages"}, {&v_pages, "v_pages"}, {&pos_pages, "pos_pages"},
                     {&block_tables, "block_tables"}, {&seq_lens, "seq_lens"}, {&k, "k"}, {&v, "v"},
                     {&positions, "positions"}, {&num_new, "num_new"}});

  p.num_tokens = T;
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.positions = positions.data_ptr<int32_t>();
  p.num_new = num_new.data_ptr<int32_t>();
  copy_strides(k, p.k_stride, 3);
  copy_strides(v, p.v_stride, 3);
  copy_strides(positions, p.positions_stride, 2);
  p.num_new_stride = num_new.stride(0);
  p.check_values = check;
  run_kernel(
      k_pages.device(), "append_kv", [&] { append_kv_cpu(p, torch_parallel_for); },
      [&] {
#ifdef SHADOWKV_WITH_CUDA
        launch_append_kv_cuda(p, k_pages.device());
#endif
      });
}

namespace {

// Both decode ops; `scores_out` undefined: no scores.
at::Tensor decode(const at::Tensor& q_in, const at::Tensor& k_pages_in, const at::Tensor& v_pages_in,
                  const at::Tensor& block_tables, const at::Tensor& seq_lens, std::optional<double> scale,
                  const at::Tensor& scores_out, bool check) {
  const at::Tensor q = last_dim_contiguous(q_in);
  check_rank(q, 3, "q", "[B, Hq, D]");
  kernel_dtype(q, "q");
  check_no_float64_on_cuda(q, "q");
  check_same_dtype(k_pages_in, "k_pages", q, "q");
  const at::Tensor k_pages = last_dim_contiguous(k_pages_in), v_pages = last_dim_contiguous(v_pages_in);
  PagedDecodeParams p;
  p.cache = make_cache(k_pages, v_pages, nullptr, block_tables, seq_lens, q, "q");
  const PagedKVCache& c = p.cache;
  const int64_t Hq = q.size(1);
  check_shape(q, "q", {c.batch, Hq, c.head_dim});
  TORCH_CHECK_VALUE(Hq % c.num_kv_heads == 0, "shadowkv: the head count of `q` (", Hq,
                    ") must be a multiple of the KV head count of `k_pages` (", c.num_kv_heads, ")");
  const double s = softmax_scale(scale, c.head_dim);

  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor scores;
  if (scores_out.defined()) {
    scores = scores_out;
    check_rank(scores, 3, "scores_out", "[B, Hkv, S]");
    check_dtype(scores, "scores_out", at::kFloat);
    check_same_device(scores, "scores_out", q, "q");
    check_shape(scores, "scores_out", {c.batch, c.num_kv_heads, scores.size(2)});
    check_no_aliasing({{&scores, "scores_out"}}, {{&q, "q"}, {&k_pages, "k_pages"}, {&v_pages, "v_pages"},
                                                  {&block_tables, "block_tables"}, {&seq_lens, "seq_lens"}});
  }

  p.num_q_heads = Hq;
  p.scale = s;
  p.q = q.data_ptr();
  p.out = out.data_ptr();
  copy_strides(q, p.q_stride, 2);
  copy_strides(out, p.o_stride, 2);
  if (scores.defined()) {
    // A fresh empty tensor's data pointer is null, which the kernels read as "no scores asked
    // for": with S = 0 their `S >= seq_lens[b]` check passed any length. A non-null pointer that
    // nothing dereferences (S = 0: no slot is written) keeps the request, so the kernels' own
    // check (and on CUDA without checks, the NaN rows) applies on every device.
    static float no_slots;
    p.scores = scores.numel() == 0 ? &no_slots : scores.data_ptr<float>();
    p.scores_len = scores.size(2);
    copy_strides(scores, p.scores_stride, 3);
  }
  p.check_values = check;
  run_kernel(
      q.device(), "paged_decode_attention", [&] { paged_decode_attention_cpu(p, torch_parallel_for); },
      [&] {
#ifdef SHADOWKV_WITH_CUDA
        launch_paged_decode_attention_cuda(p, q.device());
#endif
      });
  return out;
}

}  // namespace

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                  std::optional<double> scale, bool check) {
  return decode(q, k_pages, v_pages, block_tables, seq_lens, scale, at::Tensor(), check);
}

at::Tensor paged_decode_attention_scores(const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages,
                                         const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                         std::optional<double> scale, const at::Tensor& scores_out, bool check) {
  return decode(q, k_pages, v_pages, block_tables, seq_lens, scale, scores_out, check);
}

at::Tensor evict_compact(const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& pos_pages,
                         const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& keep,
                         const at::Tensor& steps, const at::Tensor& evicted_at,
                         const std::optional<at::Tensor>& slot_scores_in, bool check, bool stable) {
  EvictCompactParams p;
  p.cache = make_cache(k_pages, v_pages, &pos_pages, block_tables, seq_lens, k_pages, "k_pages");
  const PagedKVCache& c = p.cache;
  check_rank(keep, 3, "keep", "[B, Hkv, S]");
  check_rank(steps, 1, "steps", "[B]");
  check_rank(evicted_at, 3, "evicted_at", "[B, Hkv, T]");
  check_dtype(keep, "keep", at::kBool);
  check_dtype(steps, "steps", at::kInt);
  check_dtype(evicted_at, "evicted_at", at::kInt);
  for (const auto& [t, name] : {Named{&keep, "keep"}, Named{&steps, "steps"}, Named{&evicted_at, "evicted_at"}})
    check_same_device(*t, name, k_pages, "k_pages");
  check_shape(keep, "keep", {c.batch, c.num_kv_heads, keep.size(2)});
  check_shape(steps, "steps", {c.batch});
  check_shape(evicted_at, "evicted_at", {c.batch, c.num_kv_heads, evicted_at.size(2)});
  at::Tensor slot_scores;
  if (slot_scores_in.has_value() && slot_scores_in->defined()) {
    slot_scores = *slot_scores_in;
    check_rank(slot_scores, 3, "slot_scores", "[B, Hkv, S]");
    check_dtype(slot_scores, "slot_scores", at::kFloat);
    check_same_device(slot_scores, "slot_scores", k_pages, "k_pages");
    check_shape(slot_scores, "slot_scores", keep.sizes());
  }
  check_unit_last_stride(k_pages, "k_pages");
  check_unit_last_stride(v_pages, "v_pages");
  const std::initializer_list<Named> all{
      {&k_pages, "k_pages"}, {&v_pages, "v_pages"}, {&pos_pages, "pos_pages"}, {&block_tables, "block_tables"},
      {&seq_lens, "seq_lens"}, {&keep, "keep"},     {&steps, "steps"},         {&evicted_at, "evicted_at"},
      {&slot_scores, "slot_scores"}};
  check_no_aliasing({{&k_pages, "k_pages"}, {&v_pages, "v_pages"}, {&pos_pages, "pos_pages"},
                     {&block_tables, "block_tables"}, {&seq_lens, "seq_lens"}, {&evicted_at, "evicted_at"}},
                    all);
  if (slot_scores.defined()) check_no_aliasing({{&slot_scores, "slot_scores"}}, all);

  at::Tensor freed = at::empty({c.batch, c.max_pages}, block_tables.options());
  p.keep = reinterpret_cast<const uint8_t*>(keep.data_ptr<bool>());
  p.keep_len = keep.size(2);
  copy_strides(keep, p.keep_stride, 3);
  p.steps = steps.data_ptr<int32_t>();
  p.steps_stride = steps.stride(0);
  p.evicted_at = evicted_at.data_ptr<int32_t>();
  p.log_len = evicted_at.size(2);
  copy_strides(evicted_at, p.ev_stride, 3);
  if (slot_scores.defined()) {
    p.slot_scores = slot_scores.data_ptr<float>();
    copy_strides(slot_scores, p.scores_stride, 3);
  }
  p.freed = freed.data_ptr<int32_t>();
  copy_strides(freed, p.freed_stride, 2);
  p.check_values = check;
  p.stable = stable;
  run_kernel(
      k_pages.device(), "evict_compact", [&] { evict_compact_cpu(p, torch_parallel_for); },
      [&] {
#ifdef SHADOWKV_WITH_CUDA
        launch_evict_compact_cuda(p, k_pages.device());
#endif
      });
  return freed;
}

}  // namespace shadowkv::bindings
