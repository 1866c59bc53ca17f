"""Paged KV cache with in-place eviction and eviction logging (DESIGN.md section 3).

One page pool per layer, vLLM-like: ``k_pages, v_pages [num_pages, page_size, Hkv, D]``
and ``pos_pages [num_pages, page_size, Hkv]`` int32 (the original position held by each
slot, per KV head: heads keep different tokens). Each layer has its own block tables
``[max_batch, max_pages_per_seq]`` int32 (-1 = no page), ``seq_lens [max_batch]`` int32
and free list. The native ops move the data; this class does the page bookkeeping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


class CacheFullError(RuntimeError):
    """The page pool cannot hold the request; raised before anything is written."""


@dataclass
class LayerCache:
    """The pool and tables of one layer. Tensors are mutated in place by the ops."""

    k_pages: torch.Tensor
    v_pages: torch.Tensor
    pos_pages: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    free: list[int] = field(default_factory=list)  # stack of free page ids

    def pages_held(self, b: int) -> int:
        return int((self.block_tables[b] >= 0).sum())


class PagedKVCache:
    """Paged KV cache for ``num_layers`` layers and up to ``max_batch`` sequences.

    Args:
        num_layers, num_kv_heads, head_dim: model geometry.
        num_pages: pages in each layer's pool.
        page_size: tokens per page.
        max_batch: sequences (rows of the block tables).
        max_pages_per_seq: columns of the block tables.
        dtype, device: of the K/V pages.
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
    ):
        if min(num_layers, num_kv_heads, head_dim, num_pages, page_size, max_batch) <= 0:
            raise ValueError("PagedKVCache: every size argument must be positive")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.num_pages, self.page_size, self.max_batch = num_pages, page_size, max_batch
        self.max_pages_per_seq = max_pages_per_seq or num_pages
        self.dtype, self.device = dtype, torch.device(device)
        elt = torch.empty((), dtype=dtype).element_size()
        # K + V + the position of each slot per head.
        self.page_bytes = page_size * num_kv_heads * (2 * head_dim * elt + 4)
        self.layers = [self._new_layer() for _ in range(num_layers)]
        self._peak_pages = 0

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

    # ---- pages
    def reserve(self, layer: int, num_new: torch.Tensor) -> None:
        """Gives every sequence ``b`` pages for ``num_new[b]`` more tokens in ``layer``.

        Raises ``CacheFullError`` (nothing changed) when the pool or a block-table row is too
        small for the whole request.
        """
        lc = self.layers[layer]
        lens = lc.seq_lens.tolist()
        wants: list[tuple[int, int]] = []  # (sequence, pages to add)
        for b, n in enumerate(num_new.tolist()):
            if n <= 0:
                continue
            need = math.ceil((lens[b] + n) / self.page_size) - lc.pages_held(b)
            if need > 0:
                if lc.pages_held(b) + need > self.max_pages_per_seq:
                    raise CacheFullError(
                        f"sequence {b} needs {lc.pages_held(b) + need} pages in layer {layer}, "
                        f"max_pages_per_seq is {self.max_pages_per_seq}"
                    )
                wants.append((b, need))
        total = sum(n for _, n in wants)
        if total > len(lc.free):
            raise CacheFullError(f"layer {layer} needs {total} free pages, {len(lc.free)} left of {self.num_pages}")
        for b, need in wants:
            held = lc.pages_held(b)
            ids = [lc.free.pop() for _ in range(need)]
            lc.block_tables[b, held : held + need] = torch.tensor(ids, dtype=torch.int32)
        self._peak_pages = max(self._peak_pages, self.pages_in_use())

    def release(self, b: int) -> None:
        """Returns every page of sequence ``b`` to the pools."""
        for lc in self.layers:
            row = lc.block_tables[b]
            lc.free.extend(int(p) for p in row[row >= 0].tolist())
            row.fill_(-1)
            lc.seq_lens[b] = 0

    # ---- data (thin over the ops)
    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, num_new: torch.Tensor,
               rows: slice = slice(None)) -> None:
        """Appends ``num_new[b]`` tokens to each sequence of ``rows``.

        k, v: ``[b, Hkv, T, D]``; positions: ``[b, T]`` int32; num_new: ``[b]`` int32, where
        ``b`` is the number of rows selected by ``rows`` (a slice of the batch).
        """
        full = torch.zeros(self.max_batch, dtype=torch.int32)
        full[rows] = num_new.to(torch.int32).cpu()
        self.reserve(layer, full)
        lc = self.layers[layer]
        torch.ops.shadowkv.append_kv(
            lc.k_pages, lc.v_pages, lc.pos_pages, lc.block_tables[rows], lc.seq_lens[rows],
            k, v, positions.to(torch.int32), num_new.to(device=k.device, dtype=torch.int32),
        )

    def gather(self, layer: int, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The live slots of sequence ``b`` in slot order: k, v ``[Hkv, n, D]``, pos ``[Hkv, n]``."""
        lc = self.layers[layer]
        n = int(lc.seq_lens[b])
        pages = lc.block_tables[b, : math.ceil(n / self.page_size)].long()
        flat = lambda t: t[pages].flatten(0, 1)[:n].transpose(0, 1)  # noqa: E731
        return flat(lc.k_pages), flat(lc.v_pages), flat(lc.pos_pages)

    def decode_attention(self, layer: int, q: torch.Tensor, scale: float | None = None,
                         scores_out: torch.Tensor | None = None, rows: slice = slice(None)) -> torch.Tensor:
        """One query per sequence of ``rows`` over its cached keys: q ``[b, Hq, D]`` -> ``[b, Hq, D]``;
        ``scores_out [b, Hkv, S]`` float32 receives each slot's attention mass (summed over
        the GQA group)."""
        lc = self.layers[layer]
        return torch.ops.shadowkv.paged_decode_attention(
            q, lc.k_pages, lc.v_pages, lc.block_tables[rows], lc.seq_lens[rows], scale, scores_out
        )

    def evict(self, layer: int, keep: torch.Tensor, steps: torch.Tensor, evicted_at: torch.Tensor,
              slot_scores: torch.Tensor | None = None, rows: slice = slice(None)) -> int:
        """Keeps the ``keep [b, Hkv, S]`` slots of each sequence in ``rows``, compacts in place,
        logs ``evicted_at[b, h, pos] = steps[b]`` and returns freed pages to the pool.

        Returns the number of pages freed.
        """
        lc = self.layers[layer]
        freed = torch.ops.shadowkv.evict_compact(
            lc.k_pages, lc.v_pages, lc.pos_pages, lc.block_tables[rows], lc.seq_lens[rows],
            keep, steps.to(device=evicted_at.device, dtype=torch.int32), evicted_at, slot_scores,
        )
        ids = freed[freed >= 0].tolist()
        lc.free.extend(int(p) for p in ids)
        return len(ids)
