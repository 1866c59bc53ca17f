"""Whole sequences packed end to end into rows, for the learner's replay and the sampler's prefill.

Both run a transformers model over many sequences of different lengths at once. Right-padding
them to the longest spends the model's work and memory on padding; packing puts several whole
sequences in one row, positions restarting at 0 for each (``position_ids``), and the shadow
mask keeps them apart (DESIGN §2's cu_seqlens variant, as a log transformation: a key of the
sequence starting at slot ``s`` with ``n`` tokens gets ``evicted_at <= s + n``, so no later
sequence's query sees it, and padding slots get 0).
"""

from __future__ import annotations

from typing import Sequence

import torch


def first_fit_decreasing(lengths: Sequence[int], cap: int) -> tuple[list[int], list[int], int]:
    """Places each sequence whole in a row of ``cap`` slots: longest first, each in the first
    row with room after the sequences placed there before it.

    Args:
        lengths: tokens per sequence, each at most ``cap``.
    Returns:
        ``(row_of, slot_of, rows)``: sequence ``b`` starts at slot ``slot_of[b]`` of row
        ``row_of[b]``; ``rows`` (at least 1) rows are used.
    """
    row_of, slot_of, used = [0] * len(lengths), [0] * len(lengths), []
    for b in sorted(range(len(lengths)), key=lambda b: -lengths[b]):
        n = lengths[b]
        if n > cap:
            raise ValueError(f"a sequence of {n} tokens does not fit a row of {cap}")
        r = next((r for r, u in enumerate(used) if u + n <= cap), len(used))
        if r == len(used):
            used.append(0)
        row_of[b], slot_of[b] = r, used[r]
        used[r] += n
    return row_of, slot_of, max(1, len(used))


def token_slots(lengths: torch.Tensor, start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token of sequences placed whole from flat slot ``start[b]`` on (``[B]`` int64 each,
    CPU), in sequence order: ``(sequence, position within it, flat slot)``."""
    seq = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    pos = torch.arange(len(seq)) - (torch.cumsum(lengths, 0) - lengths)[seq]
    return seq, pos, start[seq] + pos


class PackedPrompts:
    """The sampler's prefill of whole prompts, packed: rows as wide as the longest prompt,
    each prompt whole in one row (:func:`first_fit_decreasing`), positions restarting at 0.

    The model runs on the packed rows; attention sees each prompt alone (:meth:`log`), and
    :meth:`unpack` gives the cache the prompts' keys right-padded, a chunk of them at a time.

    Args:
        lens: tokens per prompt (``b`` prompts, each at least 1).
        device: where the index tensors go (the model's device).
    """

    def __init__(self, lens: Sequence[int], device: torch.device):
        self.width = width = max(lens)
        self.row_of, self.start_of, self.rows = first_fit_decreasing(lens, width)
        n = torch.tensor(lens)
        start = torch.tensor(self.row_of) * width + torch.tensor(self.start_of)  # flat slot of each token 0
        i, pos, flat = token_slots(n, start)
        self.source = (i * width + pos).to(device)  # each real slot's index in the padded [b, width]
        self.flat = flat.to(device)
        positions = torch.zeros(self.rows * width, dtype=torch.int32)
        positions[flat] = pos.to(torch.int32)
        self.positions = positions.view(self.rows, width).to(device)
        log = torch.zeros(self.rows * width, dtype=torch.int32)  # padding slots: seen by nothing
        log[flat] = (torch.tensor(self.start_of) + n)[i].to(torch.int32)
        self._row_log, self._logs = log.view(self.rows, width).to(device), {}
        last = start + n - 1
        self.last_row, self.last_col = (last // width).to(device), (last % width).to(device)
        # The cache takes each prompt's keys right-padded. All prompts padded to the longest
        # would be (prompts x width) slots, many times the packed rows when short prompts fill
        # a long one's row; so prompts go longest first, in chunks of at most rows x width
        # slots padded to their own longest: (prompt indices, [c, w] gather index into the
        # flattened rows, [c, w] int32 positions).
        self.chunks, chunk = [], []
        for b in sorted(range(len(lens)), key=lambda b: -lens[b]) + [None]:
            if chunk and (b is None or (len(chunk) + 1) * lens[chunk[0]] > self.rows * width):
                w = lens[chunk[0]]
                j = torch.arange(w)
                # past a prompt's end, its last slot again (those columns are never appended)
                gather = start[chunk][:, None] + torch.minimum(j, n[chunk][:, None] - 1)
                self.chunks.append((chunk, gather.to(device),
                                    j.to(torch.int32).expand(len(chunk), w).contiguous().to(device)))
                chunk = []
            if b is not None:
                chunk.append(b)

    def slot(self, b: int) -> tuple[int, int]:
        """(row, first slot) of prompt ``b``."""
        return self.row_of[b], self.start_of[b]

    def place(self, values: torch.Tensor, fill) -> torch.Tensor:
        """Right-padded ``[b, width, ...]`` -> packed ``[rows, width, ...]`` (``fill`` in padding
        slots), e.g. the prompts' token ids."""
        rest = values.shape[2:]
        out = values.new_full((self.rows * self.width, *rest), fill)
        out[self.flat] = values.reshape(-1, *rest)[self.source]
        return out.view(self.rows, self.width, *rest)

    def log(self, kv_heads: int) -> torch.Tensor:
        """``[rows, kv_heads, width]`` int32 ``evicted_at`` of the packed rows: a key of the
        prompt at slots ``[s, s + n)`` is seen by the queries before ``s + n`` (its own, causally),
        a padding key by none. Made once, read by every layer."""
        if kv_heads not in self._logs:
            self._logs[kv_heads] = self._row_log[:, None].expand(-1, kv_heads, -1).contiguous()
        return self._logs[kv_heads]

    @staticmethod
    def unpack(x: torch.Tensor, gather: torch.Tensor) -> torch.Tensor:
        """Packed ``[rows, H, width, D]`` -> ``[c, H, w, D]``: the prompts of a chunk
        (``chunks``), right-padded."""
        rows, H, width, D = x.shape
        return x.transpose(1, 2).reshape(rows * width, H, D)[gather].transpose(1, 2)
