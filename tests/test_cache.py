"""PagedKVCache bookkeeping: the host mirror of lengths and block tables stays equal to the
device's through appends, evictions, releases and rejected requests; ``verify`` and ``evict``
report a device that disagrees; ``fork`` copies a sequence into empty rows; on CUDA, unchecked
appends and decodes never wait for the GPU.
(Whole random programs of cache operations are in test_fuzz.py.)"""

from __future__ import annotations

import pytest
import torch

from shadowkv import CacheFullError, PagedKVCache
from shadowkv.ops import NEVER_EVICTED


def _cache(device="cpu", **kw):
    args = dict(num_layers=2, num_kv_heads=2, head_dim=8, num_pages=12, page_size=4, max_batch=3)
    args.update(kw)
    return PagedKVCache(**args, device=device)


def _append(cache, layer, counts, start, device="cpu"):
    B, T = len(counts), max(counts)
    k = torch.randn(B, cache.num_kv_heads, T, cache.head_dim, device=device)
    pos = (torch.arange(T, device=device) + torch.tensor(start, device=device)[:, None]).to(torch.int32)
    cache.append(layer, k, k, pos, counts)


def test_mirror_follows_append_evict_release():
    cache = _cache()
    _append(cache, 0, [5, 0, 9], [0, 0, 0])
    _append(cache, 1, [2, 3, 1], [0, 0, 0])
    cache.verify()
    assert [cache.seq_len(0, b) for b in range(3)] == [5, 0, 9]
    assert [cache.layers[0].pages_held(b) for b in range(3)] == [2, 0, 3]
    keep = torch.zeros(3, 2, 16, dtype=torch.bool)
    keep[0, :, :5] = True  # sequence 0 keeps everything
    keep[2, :, [0, 7]] = True  # sequence 2 keeps 2 of 9: two of its three pages go back
    log = torch.full((3, 2, 16), NEVER_EVICTED, dtype=torch.int32)
    freed = cache.evict(0, keep, torch.tensor([5, 0, 9], dtype=torch.int32), log)
    assert freed == 2 and cache.seq_len(0, 2) == 2 and cache.layers[0].pages_held(2) == 1
    cache.verify()
    cache.release(2)
    cache.verify()
    assert cache.num_free_pages() == 2 * 12 - 2 - 2  # left: layer 0 holds 2 + 0 pages, layer 1 holds 1 + 1


def test_rejected_requests_leave_the_mirror_alone():
    cache = _cache(num_pages=3)
    _append(cache, 0, [4, 4, 0], [0, 0, 0])
    with pytest.raises(CacheFullError):
        _append(cache, 0, [1, 1, 8], [4, 4, 0])  # needs 4 pages, 1 left
    cache.verify()
    assert cache.num_free_pages() == 1 + 3
    with pytest.raises(ValueError, match="num_new has 2 entries for 3 rows"):
        _append(cache, 0, [1, 1], [4, 4])
    with pytest.raises((ValueError, RuntimeError)):  # a negative position: the op rejects it
        _append(cache, 0, [1, 0, 0], [-1, 0, 0])
    cache.verify()


def test_verify_reports_a_table_changed_behind_the_cache():
    cache = _cache()
    _append(cache, 1, [3, 0, 0], [0, 0, 0])
    cache.layers[1].block_tables[0, 0] = 11
    with pytest.raises(RuntimeError, match="layer 1 sequence 0"):
        cache.verify()
    cache = _cache()
    _append(cache, 0, [3, 0, 0], [0, 0, 0])
    cache.layers[0].seq_lens[0] = 2
    with pytest.raises(RuntimeError, match="seq_lens 2 .* expects 3"):
        cache.verify()


def test_evict_reports_pages_the_cache_did_not_hand_out():
    cache = _cache()
    _append(cache, 0, [8, 0, 0], [0, 0, 0])
    lc = cache.layers[0]
    lc.block_tables[0, :2] = lc.block_tables[0, :2].flip(0).clone()  # swapped behind the cache's back
    keep = torch.zeros(3, 2, 8, dtype=torch.bool)
    keep[0, :, :2] = True
    with pytest.raises(RuntimeError, match="changed behind the cache's back"):
        cache.evict(0, keep, torch.zeros(3, dtype=torch.int32), torch.full((3, 2, 8), NEVER_EVICTED, dtype=torch.int32))


def test_evict_books_every_good_sequence_before_reporting_a_bad_one():
    cache = _cache(num_pages=12)
    _append(cache, 0, [6, 12, 12], [0, 0, 0])
    lc = cache.layers[0]
    lc.block_tables[1, :2] = lc.block_tables[1, :2].flip(0).clone()  # behind the cache's back
    keep = torch.zeros(3, 2, 12, dtype=torch.bool)
    keep[:, :, :2] = True
    with pytest.raises(RuntimeError, match="sequence 1"):
        cache.evict(0, keep, torch.full((3,), 12, dtype=torch.int32),
                    torch.full((3, 2, 12), NEVER_EVICTED, dtype=torch.int32))
    for b in (0, 2):  # compacted by the op and booked, although sequence 1 raised
        assert cache.seq_len(0, b) == int(lc.seq_lens[b]) == 2
        assert lc.pages[b] == lc.block_tables[b][lc.block_tables[b] >= 0].tolist()


def test_positions_of_the_first_slots_are_a_prefix_of_all():
    cache = _cache(num_pages=12)
    _append(cache, 0, [6, 1, 9], [0, 4, 2])
    rows = torch.tensor([2, 0])
    every = cache.positions(0, rows)
    assert every.shape == (2, 2, cache.max_pages_per_seq * cache.page_size)
    assert every[0, 0, :9].tolist() == list(range(2, 11)) and (every[0, :, 9:] == -1).all()
    for width in (9, 10, 13):
        assert torch.equal(cache.positions(0, rows, width), every[..., :width])


def test_gather_rows_is_each_sequences_gather_right_padded():
    cache = _cache(num_pages=12)
    _append(cache, 0, [6, 1, 9], [0, 4, 2])
    rows = torch.tensor([2, 0, 1])
    for width in (9, 10, 0):
        k, v = cache.gather_rows(0, rows, width)
        assert k.shape == v.shape == (3, cache.num_kv_heads, width, cache.head_dim)
        for i, b in enumerate(rows.tolist()):
            kb, vb, _ = cache.gather(0, b)
            n = min(width, kb.shape[1])
            assert torch.equal(k[i, :, :n], kb[:, :n]) and torch.equal(v[i, :, :n], vb[:, :n])
    for bad in (-1, cache.max_pages_per_seq * cache.page_size + 1):
        with pytest.raises(ValueError, match="width must be in"):
            cache.gather_rows(0, rows, bad)


def test_fork_copies_a_sequence_into_empty_rows():
    cache = _cache(num_pages=8)
    _append(cache, 0, [6, 0, 0], [0, 0, 0])
    cache.fork(0, [0, 0], [2, 1])
    cache.verify()
    lc = cache.layers[0]
    assert [cache.seq_len(0, b) for b in range(3)] == [6, 6, 6] and cache.num_free_pages() == 8 - 6 + 8
    k0, v0, p0 = cache.gather(0, 0)
    for b in (1, 2):
        kb, vb, pb = cache.gather(0, b)
        assert torch.equal(kb, k0) and torch.equal(vb, v0) and torch.equal(pb, p0)
        assert not set(lc.pages[b]) & set(lc.pages[0])  # pages of its own
    _append(cache, 0, [0, 2, 0], [0, 6, 0])  # the copies are independent
    assert cache.seq_len(0, 0) == 6 and cache.seq_len(0, 1) == 8 and torch.equal(cache.gather(0, 0)[0], k0)
    cache.verify()


def test_fork_rejects_bad_rows_and_a_full_pool_without_changes():
    cache = _cache(num_pages=3)
    _append(cache, 0, [6, 1, 0], [0, 0, 0])
    with pytest.raises(ValueError, match="empty"):
        cache.fork(0, [0], [1])
    with pytest.raises(ValueError, match="distinct"):
        cache.fork(0, [0, 0], [2, 2])
    with pytest.raises(CacheFullError):
        cache.fork(0, [0], [2])  # 2 pages wanted, none left
    cache.verify()
    assert cache.num_free_pages() == 0 + 3 and cache.seq_len(0, 2) == 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_unchecked_cuda_decode_steps_never_synchronise():
    """With ``check=False`` the cache appends (crossing page boundaries: new block-table
    entries) and decodes without one stream synchronisation; evict reads back once."""
    cache = _cache("cuda", check=False, num_pages=32)
    for layer in range(2):
        _append(cache, layer, [5, 1, 7], [0, 0, 0], "cuda")
    q = torch.randn(3, 4, 8, device="cuda")
    lens = [5, 1, 7]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(6):
            k = torch.randn(3, 2, 1, 8, device="cuda")
            pos = torch.tensor(lens, dtype=torch.int32).pin_memory().to("cuda", non_blocking=True)[:, None]
            for layer in range(2):
                cache.append(layer, k, k, pos, [1, 1, 1])
                cache.decode_attention(layer, q)
            lens = [n + 1 for n in lens]
        # The sampler's steps once sequence 1 ended: rows 0 and 2 by a device index it has once.
        index = torch.tensor([0, 2]).pin_memory().to("cuda", non_blocking=True)
        for _ in range(3):
            pos = torch.tensor([lens[0], lens[2]], dtype=torch.int32).pin_memory().to("cuda", non_blocking=True)
            for layer in range(2):
                cache.append(layer, k[:2], k[:2], pos[:, None], [1, 1], rows=[0, 2], index=index)
                cache.decode_attention(layer, q[:2], rows=index)
            lens = [lens[0] + 1, lens[1], lens[2] + 1]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cache.verify()
    assert [cache.seq_len(0, b) for b in range(3)] == lens


def test_a_rejected_append_leaves_the_cache_as_it_was():
    """The op rejects the call after the cache reserved pages for it: they go back, and the
    pool, the peak and the device table are as before (verify() would not notice a leak)."""
    cache = _cache()
    _append(cache, 0, [3, 0, 5], [0, 0, 0])
    before = (cache.num_free_pages(), cache.bytes_in_use(), cache.peak_bytes(), cache.layers[0].block_tables.clone(),
              [list(p) for p in cache.layers[0].pages], list(cache.layers[0].free))
    k = torch.randn(3, 2, 2, 8)
    pos = torch.zeros(3, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="num_new"):
        cache.append(0, k, k, pos, [9, 0, 9])  # more tokens than k holds
    with pytest.raises(TypeError, match="positions"):  # int64 positions are not cast (2**32 + 5 would be 5)
        cache.append(0, k, k, pos.long() + 2**32, [2, 2, 2])
    after = (cache.num_free_pages(), cache.bytes_in_use(), cache.peak_bytes(), cache.layers[0].block_tables,
             [list(p) for p in cache.layers[0].pages], list(cache.layers[0].free))
    assert before[:3] == after[:3] and torch.equal(before[3], after[3]) and before[4:] == after[4:]
    cache.verify()
    _append(cache, 0, [1, 1, 1], [3, 0, 5])  # and it goes on working
    cache.verify()


def test_an_append_that_fails_in_any_way_gives_its_pages_back():
    """Pages are reserved before the op runs; only ValueError/TypeError used to give them back,
    so a count past int32 (RuntimeError from the upload) or a numpy array (refused by the
    dispatcher) left a sequence holding pages at length 0, and later appends found the pool full."""
    cache = _cache(num_pages=2, max_batch=2, num_layers=1)
    k = torch.randn(2, 2, 8, 8)
    pos = torch.arange(8, dtype=torch.int32).expand(2, 8).contiguous()
    before = _state(cache)
    with pytest.raises(ValueError, match=r"num_new must hold counts in \[0, 2\*\*31\)"):
        cache.append(0, k, k, pos, [8, 2**40])
    with pytest.raises(RuntimeError, match="Tensor"):
        cache.append(0, k.numpy(), k, pos, [4, 4])
    assert _same(before, _state(cache)) and cache.bytes_in_use() == 0
    cache.append(0, k, k, pos, [4, 4])  # the pool is whole
    cache.verify()


def test_layer_indices_are_any_integer_and_rows_tensors_are_checked():
    import numpy as np

    cache = _cache()
    _append(cache, 0, [3, 2, 1], [0, 0, 0])
    assert cache.seq_len(np.int64(0), 0) == 3 and cache.seq_len(torch.tensor(0), 1) == 2
    with pytest.raises(TypeError, match="layer must be an int, got float"):
        cache.seq_len(0.0, 0)
    for rows in (torch.tensor([-1]), torch.tensor([0, 3])):  # -1 would read row 2
        with pytest.raises(ValueError, match=r"rows must lie in \[0, 3\)"):
            cache.positions(0, rows)
        with pytest.raises(ValueError, match=r"gather_rows: rows must lie in \[0, 3\)"):
            cache.gather_rows(0, rows, 4)
        with pytest.raises(ValueError, match=r"decode_attention: rows must lie in \[0, 3\)"):
            cache.decode_attention(0, torch.randn(len(rows), 2, 8), rows=rows)
    with pytest.raises(TypeError, match="dtype must be float32, float64, bfloat16 or float16"):
        _cache(dtype=torch.int64)


def test_row_indices_are_integers_never_bools_lists_or_masks():
    """A list of rows wrapped -1 to the last row unchecked, a bool tensor indexed as a mask, a
    2-D one gave 5-D outputs, and True passed as row 1 (gather then read it as a mask)."""
    import numpy as np

    cache = _cache()
    _append(cache, 0, [3, 2, 1], [0, 0, 0])
    q = torch.randn(1, 2, 8)
    for rows, got in (([-1], "list"), (torch.tensor([True, False, False]), "1-D torch.bool"),
                      (torch.tensor([[0, 1]]), "2-D torch.int64"), (torch.tensor(0), "0-D torch.int64"),
                      (torch.tensor([0], dtype=torch.uint8), "1-D torch.uint8"),
                      (torch.tensor([0], dtype=torch.int16), "1-D torch.int16")):  # torch indexes with int32/64 only
        for call in (lambda: cache.decode_attention(0, q, rows=rows), lambda: cache.positions(0, rows),
                     lambda: cache.gather_rows(0, rows, 4)):
            with pytest.raises(TypeError, match=f"rows must be a 1-D int64 tensor of row indices, got .*{got}"):
                call()
    for b in (True, np.True_, torch.tensor(True)):
        with pytest.raises(ValueError, match="b must be sequence indices"):
            cache.gather(0, b)
    k = torch.randn(2, 2, 1, 8)
    with pytest.raises(ValueError, match="rows must be distinct sequence indices"):
        cache.append(0, k, k, torch.zeros(2, 1, dtype=torch.int32), [1, 1], rows=[True, False])
    assert [t.shape for t in cache.gather(0, np.int64(1))] == [(2, 2, 8), (2, 2, 8), (2, 2)]
    assert cache.positions(0, torch.tensor([2, 0], dtype=torch.int32), 4).shape == (2, 2, 4)


def test_bad_layers_rows_and_sizes_are_value_errors():
    cache = _cache()
    k = torch.randn(1, 2, 1, 8)
    pos = torch.zeros(1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"layer must be in \[0, 2\), got 2"):
        cache.append(2, k, k, pos, [1], rows=[0])
    with pytest.raises(ValueError, match=r"rows must be distinct sequence indices in \[0, 3\), got \[-1\]"):
        cache.append(0, k, k, pos, [1], rows=[-1])
    with pytest.raises(ValueError, match=r"index must hold the rows \[2\]"):
        cache.append(0, k, k, pos, [1], rows=[2], index=torch.tensor([1]))
    with pytest.raises(ValueError, match="fork: dst"):
        cache.fork(0, [0, 0], [1, -2])  # -2 would be row 1 again
    with pytest.raises(ValueError, match="b must be"):
        cache.release(5)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"max_pages_per_seq must be an int >= 1, got {bad}"):
            _cache(max_pages_per_seq=bad)


def _state(cache, layer=0):
    lc = cache.layers[layer]
    return (cache.num_free_pages(), cache.peak_bytes(), [list(p) for p in lc.pages], list(lc.free), list(lc.lens),
            lc.block_tables.clone(), lc.seq_lens.clone(), lc.k_pages.clone(), lc.pos_pages.clone())


def _same(a, b):
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))


def test_rows_the_ops_cannot_update_in_place_are_refused_before_anything_changes():
    """evict's new lengths and freed pages must land in the cache's own tensors: a list of rows
    (copies) is refused, not compacted into copies; a slice torch cannot take (negative step)
    is refused before append reserves pages for it."""
    cache = _cache()
    _append(cache, 0, [6, 6, 6], [0, 0, 0])
    before = _state(cache)
    keep = torch.zeros(1, 2, 8, dtype=torch.bool)
    keep[..., :2] = True
    log = torch.full((1, 2, 8), NEVER_EVICTED, dtype=torch.int32)
    with pytest.raises(TypeError, match=r"rows must be a slice of the batch, got list \[1\]"):
        cache.evict(0, keep, torch.full((1,), 6, dtype=torch.int32), log, rows=[1])
    assert (log == NEVER_EVICTED).all() and _same(before, _state(cache))
    k = torch.randn(3, 2, 1, 8)
    with pytest.raises(ValueError, match="positive step"):
        cache.append(0, k, k, torch.full((3, 1), 6, dtype=torch.int32), [1, 1, 1], rows=slice(None, None, -1))
    assert _same(before, _state(cache))
    cache.evict(0, keep, torch.full((1,), 6, dtype=torch.int32), log, rows=slice(1, 2))  # a slice works
    assert [cache.seq_len(0, b) for b in range(3)] == [6, 2, 6] and (log[0, :, 2:6] == 6).all()
    cache.verify()


def test_counts_must_be_integers_one_per_row():
    cache = _cache()
    k = torch.randn(3, 2, 3, 8)
    pos = torch.zeros(3, 3, dtype=torch.int32)
    before = _state(cache)
    with pytest.raises(TypeError, match=r"num_new must hold integers, got \[2.5, 1, 1\]"):
        cache.append(0, k, k, pos, [2.5, 1, 1])  # the device would get 2, the mirror 2.5
    with pytest.raises(TypeError, match="num_new must hold integers"):
        cache.append(0, k, k, pos, torch.tensor([1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="num_new has 4 entries for 3 rows"):
        cache.reserve(0, [1, 1, 1, 1])
    assert _same(before, _state(cache))
    cache.append(0, k, k, pos, torch.tensor([1, 2, 3]))  # integer tensors are read as ints
    assert [cache.seq_len(0, b) for b in range(3)] == [1, 2, 3]
    cache.verify()


def test_positions_width_is_at_most_the_capacity():
    cache = _cache(max_pages_per_seq=2)
    _append(cache, 0, [3, 0, 0], [0, 0, 0])
    rows = torch.tensor([0])
    assert cache.positions(0, rows, 8).shape == (1, 2, 8)
    for bad in (9, -1):
        with pytest.raises(ValueError, match=rf"width must be in \[0, 8\] .* got {bad}"):
            cache.positions(0, rows, bad)
