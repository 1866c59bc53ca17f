"""torch.compile: a training step built on the ops traces into one graph and matches eager."""

import pytest
import torch

from shadowkv import ops
from shadowkv.reference import random_evicted_at


class _Block(torch.nn.Module):
    """Projections + shadow attention + output projection: one learner attention layer."""

    def __init__(self, dim=32, heads=4, kv_heads=2):
        super().__init__()
        self.h, self.kvh, self.d = heads, kv_heads, dim // heads
        self.q = torch.nn.Linear(dim, heads * self.d)
        self.kv = torch.nn.Linear(dim, 2 * kv_heads * self.d)
        self.o = torch.nn.Linear(heads * self.d, dim)

    def forward(self, x, evicted_at):
        B, L, _ = x.shape
        q = self.q(x).view(B, L, self.h, self.d).transpose(1, 2)
        k, v = self.kv(x).view(B, L, 2, self.kvh, self.d).permute(2, 0, 3, 1, 4)
        out = ops.shadow_attention(q, k, v, evicted_at)
        return self.o(out.transpose(1, 2).reshape(B, L, -1))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_step_matches_eager(backend):
    torch.manual_seed(0)
    block = _Block()
    x = torch.randn(2, 40, 32)
    ev = random_evicted_at((2, 2, 40), horizon=40, keep=0.3, sinks=2, generator=torch.Generator().manual_seed(1))

    def step(x, ev):
        return block(x, ev).square().mean()

    loss = step(x, ev)
    grads = torch.autograd.grad(loss, list(block.parameters()))
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    loss_c = compiled(x, ev)
    grads_c = torch.autograd.grad(loss_c, list(block.parameters()))
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
    for g, gc in zip(grads, grads_c):
        torch.testing.assert_close(gc, g, rtol=1e-4, atol=1e-6)
