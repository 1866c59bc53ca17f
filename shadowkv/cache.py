"""Paged KV cache with in-place eviction and eviction logging (DESIGN.md section 3).

One page pool per layer, vLLM-like: ``k_pages, v_pages [num_pages, page_size, Hkv, D]``
and ``pos_pages [num_pages, page_size, Hkv]`` int32 (the original position held by each
slot, per KV head: heads keep different tokens). Each layer has its own block tables
``[max_batch, max_pages_per_seq]`` int32 (-1 = no page), ``seq_lens [max_batch]`` int32
and free list. The native ops move the data; this class does the page bookkeeping.

The bookkeeping runs on the host from a mirror of ``seq_lens`` and of each block-table row,
so that appending and decoding never read the device (on a GPU every read is a stream
synchronisation: the sampler's decode step would wait for the GPU once per layer and
sequence). Only :meth:`evict` reads back (the freed pages and new lengths, once per call).
Mutate a cache only through its methods; :meth:`verify` compares the mirror with the device.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch

from . import ops


# Row-index tensors: what torch indexes with as indices (uint8 and bool tensors index as masks).
_INDEX_DTYPES = (torch.int64, torch.int32)


def _is_bool(x) -> bool:
    """A Python, NumPy or 0-d torch bool, which ``operator.index`` would take as 0 or 1."""
    return (isinstance(x, bool) or (type(x).__module__ == "numpy" and type(x).__name__ in ("bool_", "bool"))
            or (isinstance(x, torch.Tensor) and x.dtype == torch.bool))


class CacheFullError(RuntimeError):
    """The page pool cannot hold the request; raised before anything is written."""


def to_device(values, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host list (or CPU tensor) as a tensor on ``device``; to a GPU through pinned memory
    without waiting (a copy from pageable memory would synchronise the stream)."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass
class LayerCache:
    """The pool and tables of one layer. Tensors are mutated in place by the ops.

    ``lens`` and ``pages`` mirror ``seq_lens`` and the held entries of each block-table row
    on the host; ``free`` is the stack of free page ids.
    """

    k_pages: torch.Tensor
    v_pages: torch.Tensor
    pos_pages: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    free: list[int] = field(default_factory=list)
    lens: list[int] = field(default_factory=list)
    pages: list[list[int]] = field(default_factory=list)

    def pages_held(self, b: int) -> int:
        return len(self.pages[b])


class PagedKVCache:
    """Paged KV cache for ``num_layers`` layers and up to ``max_batch`` sequences.

    Args:
        num_layers, num_kv_heads, head_dim: model geometry.
        num_pages: pages in each layer's pool.
        page_size: tokens per page.
        max_batch: sequences (rows of the block tables).
        max_pages_per_seq: columns of the block tables.
        dtype, device: of the K/V pages.
        check: passed to the ops (``append_kv``, ``paged_decode_attention``,
            ``evict_compact``). ``False`` lets CUDA calls run without synchronising the
            stream; a value the device then rejects leaves the sequence poisoned
            (``seq_lens = -1``), which :meth:`evict` and :meth:`verify` report. The CPU ops
            check regardless.
        stable_evict: passed to ``evict_compact`` as ``stable``. The default ``False`` moves
            only the survivors past the new length into the evicted slots below it (a page or
            so per eviction in a rollout, where the stable order rewrites a streaming window
            every time); slot order then no longer follows position order, which
            ``pos_pages`` records and nothing here depends on (the policies rank positions,
            decode attention is order-free). ``True`` keeps survivors in position order.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_pages: int,
        page_size: int = 16,
        max_batch: int = 1,
        max_pages_per_seq: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        check: bool = True,
        stable_evict: bool = False,
    ):
        sizes = dict(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, num_pages=num_pages,
                     page_size=page_size, max_batch=max_batch,
                     max_pages_per_seq=num_pages if max_pages_per_seq is None else max_pages_per_seq)
        for name, value in sizes.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PagedKVCache: {name} must be an int >= 1, got {value!r}")
        if dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):  # what the ops take
            raise TypeError(f"PagedKVCache: dtype must be float32, float64, bfloat16 or float16, got {dtype!r}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.num_pages, self.page_size, self.max_batch = num_pages, page_size, max_batch
        self.max_pages_per_seq = sizes["max_pages_per_seq"]
        self.dtype, self.device, self.check = dtype, torch.device(device), check
        self.stable_evict = stable_evict
        elt = torch.empty((), dtype=dtype).element_size()
        # K + V + the position of each slot per head.
        self.page_bytes = page_size * num_kv_heads * (2 * head_dim * elt + 4)
        self.layers = [self._new_layer() for _ in range(num_layers)]
        self._peak_pages = 0
        self._uniform_counts: dict[tuple, torch.Tensor] = {}  # read only by the ops

    def _new_layer(self) -> LayerCache:
        P, S, H, D = self.num_pages, self.page_size, self.num_kv_heads, self.head_dim
        kw = dict(device=self.device)
        return LayerCache(
            k_pages=torch.zeros(P, S, H, D, dtype=self.dtype, **kw),
            v_pages=torch.zeros(P, S, H, D, dtype=self.dtype, **kw),
            pos_pages=torch.zeros(P, S, H, dtype=torch.int32, **kw),
            block_tables=torch.full((self.max_batch, self.max_pages_per_seq), -1, dtype=torch.int32, **kw),
            seq_lens=torch.zeros(self.max_batch, dtype=torch.int32, **kw),
            free=list(range(P - 1, -1, -1)),
            lens=[0] * self.max_batch,
            pages=[[] for _ in range(self.max_batch)],
        )

    # ---- accounting
    def pages_in_use(self) -> int:
        return sum(self.num_pages - len(layer.free) for layer in self.layers)

    def num_free_pages(self) -> int:
        """Free pages summed over layers."""
        return sum(len(layer.free) for layer in self.layers)

    def bytes_in_use(self) -> int:
        """Bytes of the pages currently allocated (whole pages, all layers)."""
        return self.pages_in_use() * self.page_bytes

    def peak_bytes(self) -> int:
        """Highest ``bytes_in_use()`` since construction or ``reset_peak()``."""
        return self._peak_pages * self.page_bytes

    def reset_peak(self) -> None:
        self._peak_pages = self.pages_in_use()

    def _layer(self, layer: int) -> LayerCache:
        try:
            index = operator.index(layer)  # numpy and 0-d integer tensors too
        except TypeError:
            raise TypeError(f"PagedKVCache: layer must be an int, got {type(layer).__name__} {layer!r}") from None
        if not 0 <= index < self.num_layers:
            raise ValueError(f"PagedKVCache: layer must be in [0, {self.num_layers}), got {index}")
        return self.layers[index]

    def _rows(self, what: str, rows, distinct: bool = True) -> list[int]:
        """``rows`` (sequence indices) as ints, checked to lie in [0, max_batch) (and be
        distinct): a negative index would silently name another row."""
        rows = list(rows)
        try:  # a bool is no row index: operator.index took True as row 1
            ints = None if any(_is_bool(b) for b in rows) else [operator.index(b) for b in rows]
        except TypeError:
            ints = None
        if ints is None or not all(0 <= b < self.max_batch for b in ints) or (distinct and len(set(ints)) != len(ints)):
            raise ValueError(f"{what} must be {'distinct ' if distinct else ''}sequence indices in "
                             f"[0, {self.max_batch}), got {rows}")
        return ints

    def _row(self, b) -> int:
        return self._rows("b", [b], distinct=False)[0]

    def _slice(self, rows) -> list[int]:
        """The rows a ``rows`` slice selects. A slice is what the ops can update in place (a view
        of the block tables and lengths); a negative step, which torch cannot slice with, is
        refused here, before anything is reserved or written."""
        if not isinstance(rows, slice):
            raise TypeError(f"rows must be a slice of the batch, got {type(rows).__name__} {rows!r}")
        if rows.step is not None and operator.index(rows.step) <= 0:
            raise ValueError(f"rows must be a slice with a positive step, got {rows}")
        return list(range(self.max_batch)[rows])

    @staticmethod
    def _counts(num_new, entries: int) -> list[int]:
        """``num_new`` (ints, or a tensor read to the host) as ``entries`` Python ints: a float
        count would make the host mirror's lengths disagree with the device's int32 ones."""
        counts = num_new.tolist() if isinstance(num_new, torch.Tensor) else list(num_new)
        try:
            ints = [operator.index(n) for n in counts]
        except TypeError:
            raise TypeError(f"num_new must hold integers, got {counts}") from None
        if len(ints) != entries:
            raise ValueError(f"num_new has {len(ints)} entries for {entries} rows")
        if any(not 0 <= n < 2**31 for n in ints):  # the op's int32 counts; checked before pages are reserved
            raise ValueError(f"num_new must hold counts in [0, 2**31), got {ints}")
        return ints

    def seq_len(self, layer: int, b: int) -> int:
        """Slots in use by sequence ``b`` in ``layer`` (from the host mirror: no device read)."""
        return self._layer(layer).lens[self._row(b)]

    def verify(self) -> None:
        """Raises RuntimeError if the device's lengths or block tables differ from the
        bookkeeping (a value rejected by an unchecked op, or a table changed behind the
        cache's back). Reads the device: one synchronisation per layer."""
        for layer, lc in enumerate(self.layers):
            table = torch.full((self.max_batch, self.max_pages_per_seq), -1, dtype=torch.int32)
            for b, row in enumerate(lc.pages):
                table[b, : len(row)] = torch.tensor(row, dtype=torch.int32)
            dev = torch.cat([lc.seq_lens[:, None], lc.block_tables], 1).cpu()
            for b in range(self.max_batch):
                if int(dev[b, 0]) != lc.lens[b] or not torch.equal(dev[b, 1:], table[b]):
                    raise RuntimeError(
                        f"PagedKVCache layer {layer} sequence {b}: the device holds seq_lens {int(dev[b, 0])} and "
                        f"pages {dev[b, 1:][dev[b, 1:] >= 0].tolist()}, the cache expects {lc.lens[b]} and "
                        f"{lc.pages[b]} (seq_lens -1: an unchecked op rejected this sequence's values)"
                    )

    # ---- pages
    def reserve(self, layer: int, num_new: list[int] | torch.Tensor) -> list[tuple[int, int]]:
        """Gives every sequence ``b`` pages for ``num_new[b]`` more tokens in ``layer``.

        ``num_new``: ``max_batch`` ints (a tensor is read to the host first). Raises
        ``CacheFullError`` (nothing changed) when the pool or a block-table row is too small
        for the whole request. Returns ``(b, pages added)`` for each sequence that got pages.
        """
        lc = self._layer(layer)
        counts = self._counts(num_new, self.max_batch)
        wants: list[tuple[int, int]] = []  # (sequence, pages to add)
        for b, n in enumerate(counts):
            if n <= 0:
                continue
            held = lc.pages_held(b)
            need = math.ceil((lc.lens[b] + n) / self.page_size) - held
            if need > 0:
                if held + need > self.max_pages_per_seq:
                    raise CacheFullError(
                        f"sequence {b} needs {held + need} pages in layer {layer}, "
                        f"max_pages_per_seq is {self.max_pages_per_seq}"
                    )
                wants.append((b, need))
        total = sum(n for _, n in wants)
        if total > len(lc.free):
            raise CacheFullError(f"layer {layer} needs {total} free pages, {len(lc.free)} left of {self.num_pages}")
        if wants:
            self._grant(lc, wants, [])
        return wants

    def _ungrant(self, lc: LayerCache, wants: list[tuple[int, int]], peak: int) -> None:
        """Undoes a grant of ``wants`` (the last one made) whose op failed before writing: the
        pages go back to the free list in the order they left it, their table entries to -1,
        and the peak to ``peak``."""
        rows, cols = [], []
        for b, n in reversed(wants):
            for _ in range(n):
                rows.append(b)
                cols.append(len(lc.pages[b]) - 1)
                lc.free.append(lc.pages[b].pop())
        where = to_device([rows, cols], self.device, torch.int64)
        lc.block_tables[where[0], where[1]] = -1
        self._peak_pages = peak

    def _grant(self, lc: LayerCache, wants: list[tuple[int, int]], extra: list[int]) -> torch.Tensor:
        """Moves ``n`` pages from the free list (the caller checked it suffices) to the end of
        row ``b`` for each ``(b, n)`` of ``wants``, in the bookkeeping and in the device block
        table. Returns ``[rows, columns, pages, *extra]`` of the new entries on the device
        (``extra``: one more list of the same length, uploaded in the same copy)."""
        rows, cols, ids = [], [], []
        for b, n in wants:
            for _ in range(n):
                rows.append(b)
                cols.append(len(lc.pages[b]))
                lc.pages[b].append(lc.free.pop())
                ids.append(lc.pages[b][-1])
        where = to_device([rows, cols, ids] + ([extra] if extra else []), self.device, torch.int64)
        lc.block_tables[where[0], where[1]] = where[2].to(torch.int32)
        self._peak_pages = max(self._peak_pages, self.pages_in_use())
        return where

    def release(self, b: int) -> None:
        """Returns every page of sequence ``b`` to the pools."""
        self._row(b)
        for lc in self.layers:
            lc.free.extend(lc.pages[b])
            lc.pages[b] = []
            lc.lens[b] = 0
            lc.block_tables[b].fill_(-1)
            lc.seq_lens[b] = 0

    # ---- data (thin over the ops)
    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               num_new: list[int] | torch.Tensor, rows: slice | list[int] = slice(None),
               index: torch.Tensor | None = None) -> None:
        """Appends ``num_new[b]`` tokens to each sequence of ``rows``.

        k, v: ``[b, Hkv, T, D]``; positions: ``[b, T]`` int32; num_new: ``b`` ints (a list
        keeps the call free of device reads; a tensor is read to the host), where ``b`` is
        the number of rows selected by ``rows`` (a slice of the batch, or distinct row indices).
        ``index``: with a list of rows, the same rows as int64 on the cache's device, which
        saves their upload (a caller appending to the same rows in every layer has it once).
        A call the op rejects (ValueError/TypeError naming the argument; any exception it
        raises) leaves the cache as it was: the pages reserved for it go back to the pool.
        """
        lc = self._layer(layer)
        selected = self._slice(rows) if isinstance(rows, slice) else self._rows("rows", rows)
        if index is not None and self.check and (isinstance(rows, slice) or index.tolist() != selected):
            raise ValueError(f"append: index must hold the rows {selected} (with a list of rows), got {index}")
        counts = self._counts(num_new, len(selected))
        full = [0] * self.max_batch
        for b, n in zip(selected, counts):
            full[b] = n
        peak = self._peak_pages
        granted = self.reserve(layer, full)
        if isinstance(rows, slice):  # views: the op updates seq_lens in place
            tables, lens = lc.block_tables[rows], lc.seq_lens[rows]
        else:  # copies: the new lengths are scattered back
            idx = to_device(selected, self.device, torch.int64) if index is None else index
            tables, lens = lc.block_tables[idx], lc.seq_lens[idx]
        try:
            torch.ops.shadowkv.append_kv(
                lc.k_pages, lc.v_pages, lc.pos_pages, tables, lens,
                k, v, positions, self._counts_on(counts, k.device), self.check,
            )
        except Exception:  # rejected before anything was written: the op checks every argument
            # first, and its own errors come back as ValueError; the others (a non-tensor
            # argument, which the dispatcher refuses) are raised before it runs.
            if granted:
                self._ungrant(lc, granted, peak)
            raise
        if not isinstance(rows, slice):
            lc.seq_lens[idx] = lens
        for b, n in zip(selected, counts):
            lc.lens[b] += n

    def fork(self, layer: int, src: list[int], dst: list[int]) -> None:
        """Gives each empty sequence ``dst[i]`` a copy of sequence ``src[i]``'s slots in ``layer``
        (its own pages: later appends and evictions of either leave the other alone), e.g. to
        prefill a prompt once for every sample of a GRPO group.

        Raises ValueError if a ``dst`` row holds tokens or is also a source, CacheFullError
        (nothing changed) when the pool is too small.
        """
        lc = self._layer(layer)
        src, dst = self._rows("fork: src", src, distinct=False), self._rows("fork: dst", dst)
        if len(src) != len(dst) or set(src) & set(dst):
            raise ValueError(f"fork: need distinct destination rows, none a source; got src={src}, dst={dst}")
        if any(lc.lens[b] or lc.pages[b] for b in dst):
            raise ValueError(f"fork: destination rows must be empty in layer {layer}, got {dst}")
        total = sum(len(lc.pages[a]) for a in src)
        if total > len(lc.free):
            raise CacheFullError(f"layer {layer} needs {total} free pages to fork, {len(lc.free)} left of "
                                 f"{self.num_pages}")
        if total == 0:
            return
        # New pages in the same order as the sources' pages: copy i goes from extra[i] to where[2][i].
        where = self._grant(lc, [(b, len(lc.pages[a])) for a, b in zip(src, dst)],
                            [page for a in src for page in lc.pages[a]])
        for pool in (lc.k_pages, lc.v_pages, lc.pos_pages):
            pool[where[2]] = pool[where[3]]
        pairs = to_device([src, dst], self.device, torch.int64)
        lc.seq_lens[pairs[1]] = lc.seq_lens[pairs[0]]
        for a, b in zip(src, dst):
            lc.lens[b] = lc.lens[a]

    def _counts_on(self, counts: list[int], device: torch.device) -> torch.Tensor:
        """``counts`` as int32 on ``device``; a run of equal counts (every decode step: one token
        per sequence, every layer) is built once and reused rather than copied up each call."""
        if counts and all(n == counts[0] for n in counts):
            key = (counts[0], len(counts), str(device))
            if key not in self._uniform_counts:
                self._uniform_counts[key] = torch.full((len(counts),), counts[0], dtype=torch.int32, device=device)
            return self._uniform_counts[key]
        return to_device(counts, device, torch.int32)

    def gather(self, layer: int, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The live slots of sequence ``b`` in slot order: k, v ``[Hkv, n, D]``, pos ``[Hkv, n]``."""
        lc = self._layer(layer)
        b = self._row(b)  # as an int: torch reads a bool index as a mask
        n = lc.lens[b]
        pages = lc.block_tables[b, : math.ceil(n / self.page_size)].long()
        flat = lambda t: t[pages].flatten(0, 1)[:n].transpose(0, 1)  # noqa: E731
        return flat(lc.k_pages), flat(lc.v_pages), flat(lc.pos_pages)

    def _check_index(self, what: str, rows: torch.Tensor) -> None:
        """Refuses anything but a 1-D integer tensor of row indices (a list wrapped negative
        indices unchecked, a bool tensor indexes as a mask, a 2-D one gave 5-D outputs), and, with
        ``check``, indices outside [0, max_batch): torch would read a negative one as another row
        (a device read on CUDA, which ``check=False`` skips)."""
        if not isinstance(rows, torch.Tensor) or rows.dim() != 1 or rows.dtype not in _INDEX_DTYPES:
            got = (f"a {rows.dim()}-D {rows.dtype} tensor" if isinstance(rows, torch.Tensor)
                   else f"{type(rows).__name__} {rows!r}")
            raise TypeError(f"{what}: rows must be a 1-D int64 tensor of row indices, got {got}")
        if self.check and rows.numel() and bool(((rows < 0) | (rows >= self.max_batch)).any()):
            raise ValueError(f"{what}: rows must lie in [0, {self.max_batch}), got {rows.tolist()}")

    def _slots(self, what: str, layer: int, rows: torch.Tensor, width: int | None):
        """(the layer, ``f(pool)``): ``f`` reads a per-slot page pool (``[pages, page, Hkv, ...]``)
        for the first ``width`` slots (default every slot) of the sequences ``rows`` in slot
        order: ``[n, Hkv, width, ...]``, unspecified past each length (-1 table entries read
        page 0)."""
        lc = self._layer(layer)
        self._check_index(what, rows)
        capacity = self.max_pages_per_seq * self.page_size
        if width is not None and not 0 <= width <= capacity:
            raise ValueError(f"{what}: width must be in [0, {capacity}] (max_pages_per_seq * page_size), got {width}")
        pages = self.max_pages_per_seq if width is None else -(-width // self.page_size)
        table = lc.block_tables[rows][:, :pages].clamp(min=0).long()
        return lc, lambda pool: pool[table].flatten(1, 2)[:, :width].transpose(1, 2)

    def gather_rows(self, layer: int, rows: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``width`` slots of the sequences ``rows`` (``[n]`` int64 on the cache's
        device) in slot order, right-padded: k, v ``[n, Hkv, width, D]``. Slots at or past a
        sequence's length hold unspecified values (another page's, or stale ones): mask them."""
        lc, read = self._slots("gather_rows", layer, rows, width)
        return read(lc.k_pages), read(lc.v_pages)

    def positions(self, layer: int, rows: torch.Tensor, width: int | None = None) -> torch.Tensor:
        """Positions held by the first ``width`` slots (default: every slot, ``max_pages_per_seq
        * page_size``) of the sequences ``rows`` (``[n]`` int64 on the cache's device):
        ``[n, Hkv, width]`` int32, -1 past each length."""
        lc, read = self._slots("positions", layer, rows, width)
        pos = read(lc.pos_pages)
        slot = torch.arange(pos.shape[-1], device=pos.device)
        return pos.masked_fill(slot >= lc.seq_lens[rows][:, None, None], -1)

    def decode_attention(self, layer: int, q: torch.Tensor, scale: float | None = None,
                         scores_out: torch.Tensor | None = None,
                         rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        """One query per sequence of ``rows`` (a slice of the batch, or ``[b]`` int64 row indices
        on the cache's device) over its cached keys: q ``[b, Hq, D]`` -> ``[b, Hq, D]``;
        ``scores_out [b, Hkv, S]`` float32 receives each slot's attention mass (summed over
        the GQA group)."""
        lc = self._layer(layer)
        if not isinstance(rows, slice):
            self._check_index("decode_attention", rows)
        return ops.paged_decode_attention(q, lc.k_pages, lc.v_pages, lc.block_tables[rows], lc.seq_lens[rows], scale,
                                          scores_out, self.check)

    def evict(self, layer: int, keep: torch.Tensor, steps: torch.Tensor, evicted_at: torch.Tensor,
              slot_scores: torch.Tensor | None = None, rows: slice = slice(None)) -> int:
        """Keeps the ``keep [b, Hkv, S]`` slots of each sequence in ``rows`` (a slice of the batch
        with a positive step: the op writes the new lengths through views), compacts in place
        (``stable_evict`` says how), logs ``evicted_at[b, h, pos] = steps[b]`` (``steps``:
        ``[b]`` int32 on the cache's device) and returns freed pages to the pool.

        Reads the freed pages and new lengths back to the host (one synchronisation).
        Returns the number of pages freed.
        """
        lc = self._layer(layer)
        selected = self._slice(rows)  # before the op: its new lengths must land in the cache's own tensors
        freed = torch.ops.shadowkv.evict_compact(
            lc.k_pages, lc.v_pages, lc.pos_pages, lc.block_tables[rows], lc.seq_lens[rows],
            keep, steps, evicted_at, slot_scores, self.check, self.stable_evict,
        )
        back = torch.cat([lc.seq_lens[rows][:, None], freed], 1).tolist()
        released, errors = 0, []
        # Every sequence the op compacted is booked before any error is raised, so that one bad
        # sequence does not leave the others' bookkeeping behind the device.
        for b, (new_len, *row) in zip(selected, back):
            held = math.ceil(new_len / self.page_size)
            ids = [p for p in row if p >= 0]
            if new_len < 0:
                errors.append(f"evict_compact rejected the values of sequence {b} in layer {layer} (check=False): "
                              f"the sequence is left as it was and poisoned (seq_lens = -1)")
            elif ids != lc.pages[b][held:]:
                errors.append(f"PagedKVCache layer {layer} sequence {b}: evict_compact freed pages {ids}, the cache "
                              f"expected {lc.pages[b][held:]}; the block table was changed behind the cache's back")
            else:
                lc.free.extend(ids)
                lc.pages[b] = lc.pages[b][:held]
                lc.lens[b] = new_len
                released += len(ids)
        if errors:
            raise RuntimeError("; ".join(errors))
        return released
