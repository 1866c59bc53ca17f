"""torch.compile: a training step built on the ops traces into one graph and matches eager."""

import pytest
import torch

from shadowkv import ops
from shadowkv.reference import PagedState, random_evicted_at, random_paged_state


class _Block(torch.nn.Module):
    """Projections + shadow attention + output projection: one learner attention layer."""

    def __init__(self, dim=32, heads=4, kv_heads=2):
        super().__init__()
        self.h, self.kvh, self.d = heads, kv_heads, dim // heads
        self.q = torch.nn.Linear(dim, heads * self.d)
        self.kv = torch.nn.Linear(dim, 2 * kv_heads * self.d)
        self.o = torch.nn.Linear(heads * self.d, dim)

    def forward(self, x, evicted_at, seq_lens=None):
        B, L, _ = x.shape
        q = self.q(x).view(B, L, self.h, self.d).transpose(1, 2)
        k, v = self.kv(x).view(B, L, 2, self.kvh, self.d).permute(2, 0, 3, 1, 4)
        out = ops.shadow_attention(q, k, v, evicted_at, seq_lens=seq_lens)
        return self.o(out.transpose(1, 2).reshape(B, L, -1))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "seq_lens"])
def test_compiled_step_matches_eager(backend, padded):
    """With ``seq_lens`` too: its range check reads values, so a trace skips it (as the fake
    kernels skip value checks) and the graph stays whole."""
    torch.manual_seed(0)
    block = _Block()
    x = torch.randn(2, 40, 32)
    ev = random_evicted_at((2, 2, 40), horizon=40, keep=0.3, sinks=2, generator=torch.Generator().manual_seed(1))
    lens = torch.tensor([40, 23]) if padded else None

    def step(x, ev):
        return block(x, ev, lens).square().mean()

    loss = step(x, ev)
    grads = torch.autograd.grad(loss, list(block.parameters()))
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    loss_c = compiled(x, ev)
    grads_c = torch.autograd.grad(loss_c, list(block.parameters()))
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
    for g, gc in zip(grads, grads_c):
        torch.testing.assert_close(gc, g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("with_scores", [False, True], ids=["no_scores", "scores"])
def test_compiled_decode_step_matches_eager(backend, with_scores):
    """A sampler's decode step in one graph: append a token, attend (with or without the per-slot
    scores), evict. The cache ops write their arguments in place; the compiled step must leave
    the cache, the log and the output exactly as eager does. (The plain decode call is an op
    without mutable arguments: inductor cannot lower one whose only mutable argument is None.)"""
    gen = torch.Generator().manual_seed(2)
    state = random_paged_state([5, 3], 2, 8, 4, preallocated=2, generator=gen)
    q = torch.randn(2, 4, 8, generator=gen)
    k = torch.randn(2, 2, 1, 8, generator=gen)
    pos = torch.tensor([[40], [41]], dtype=torch.int32)  # past the random state's positions
    keep = torch.zeros(2, 2, 8, dtype=torch.bool)
    keep[0, :, :4] = True
    keep[1, :, 1:3] = True
    steps = torch.tensor([42, 42], dtype=torch.int32)

    def step(k_pages, v_pages, pos_pages, tables, lens, log, scores):
        ops.append_kv(k_pages, v_pages, pos_pages, tables, lens, k, k, pos, torch.ones(2, dtype=torch.int32))
        out = ops.paged_decode_attention(q, k_pages, v_pages, tables, lens, scores_out=scores)
        freed = ops.evict_compact(k_pages, v_pages, pos_pages, tables, lens, keep, steps, log)
        return out, freed

    def fresh():
        log = torch.full((2, 2, 48), ops.NEVER_EVICTED, dtype=torch.int32)
        scores = torch.zeros(2, 2, 8) if with_scores else None
        return [t.clone() for t in state[:5]] + [log, scores]

    eager, compiled = fresh(), fresh()
    expected = step(*eager)
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend=backend)(*compiled)
    for a, b in zip([*expected, *eager], [*got, *compiled]):
        assert (a is None and b is None) or torch.equal(a, b)


def _error(fn) -> str:
    with pytest.raises((TypeError, ValueError)) as e:
        fn()
    return f"{e.type.__name__}: {str(e.value).splitlines()[0]}"


def _dtype_mistakes(device: str) -> dict:
    """One call per dtype mistake the ops refuse, on ``device`` tensors."""
    state = PagedState(*(t.to(device) for t in random_paged_state([3, 5], 2, 8, 4, spare_pages=1)))
    q = torch.zeros(1, 2, 3, 8, device=device)
    ev = torch.zeros(1, 2, 5, dtype=torch.int32, device=device)
    k = torch.zeros(1, 2, 5, 8, device=device)
    qd = torch.zeros(2, 4, 8, device=device)
    new = torch.zeros(2, 2, 1, 8, device=device)
    pos, num = torch.zeros(2, 1, dtype=torch.int32, device=device), torch.ones(2, dtype=torch.int32, device=device)
    fwd, decode, append = (torch.ops.shadowkv.shadow_attention_fwd, torch.ops.shadowkv.paged_decode_attention,
                           torch.ops.shadowkv.append_kv)
    return {
        "evicted_at int64": lambda: fwd(q, k, k, ev.long(), 0, None),
        "q int32": lambda: fwd(q.int(), k, k, ev, 0, None),
        "k float64": lambda: fwd(q, k.double(), k, ev, 0, None),
        "decode pages bfloat16": lambda: decode(qd, state.k_pages.bfloat16(), state.v_pages, state.block_tables,
                                                state.seq_lens, None, True),
        "decode seq_lens int64": lambda: decode(qd, state.k_pages, state.v_pages, state.block_tables,
                                                state.seq_lens.long(), None, True),
        "append k float16": lambda: append(*[t.clone() for t in state], new.half(), new, pos, num, True),
    }


@pytest.mark.parametrize("mistake", list(_dtype_mistakes("meta")))
def test_fake_kernels_name_dtype_mistakes_as_the_kernels_do(mistake):
    """A traced call (fake tensors) and an eager one fail with the same words: "must be int32, got
    int64" from both (the fakes said "torch.int32", the C++ checks "Long")."""
    assert _error(_dtype_mistakes("meta")[mistake]) == _error(_dtype_mistakes("cpu")[mistake])
