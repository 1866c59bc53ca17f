"""tempered_kl (SMD's per-token KL over the vocabulary, a block of rows at a time) and
tempered_token_logprobs (the policy term's log-probs): the values and gradients of the plain
autograd formulas, in float64 (gradcheck too), for both directions and any block size, while
their graphs save nothing but their inputs."""

from __future__ import annotations

import math

import pytest
import torch

from shadowkv import vocab_kl
from shadowkv.vocab_kl import tempered_entropy, tempered_kl, tempered_log_softmax, tempered_token_logprobs


def _reference(t, s, temperature, direction):
    t = torch.log_softmax(t.detach() / temperature, -1)
    s = torch.log_softmax(s / temperature, -1)
    return (t.exp() * (t - s)).sum(-1) if direction == "forward" else (s.exp() * (s - t)).sum(-1)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 3.0])
@pytest.mark.parametrize("block_rows", [1, 3, None], ids=["row", "3rows", "all"])
@pytest.mark.parametrize("shape", [(7, 11), (2, 5, 13), (0, 9)], ids=["KV", "BRV", "empty"])
def test_values_and_gradients_are_the_autograd_formulas(monkeypatch, direction, temperature, block_rows, shape):
    if block_rows is not None:
        monkeypatch.setattr(vocab_kl, "CPU_BLOCK", block_rows * shape[-1])
    g = torch.Generator().manual_seed(1)
    t = 3 * torch.randn(shape, generator=g, dtype=torch.float64)
    s = (3 * torch.randn(shape, generator=g, dtype=torch.float64)).requires_grad_()
    s_ref = s.detach().clone().requires_grad_()
    got, want = tempered_kl(t, s, temperature, direction), _reference(t, s_ref, temperature, direction)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    w = torch.randn(shape[:-1], generator=g, dtype=torch.float64)
    (got * w).sum().backward()
    (want * w).sum().backward()
    torch.testing.assert_close(s.grad, s_ref.grad, rtol=1e-10, atol=1e-12)
    if s.numel():
        x = s.detach().requires_grad_()
        assert torch.autograd.gradcheck(lambda x: tempered_kl(t, x, temperature, direction), (x,))


@pytest.mark.parametrize("block_rows", [1, 3, None], ids=["row", "3rows", "all"])
def test_entropy_is_the_formula(monkeypatch, block_rows):
    if block_rows is not None:
        monkeypatch.setattr(vocab_kl, "CPU_BLOCK", block_rows * 11)
    x = 3 * torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    logp = torch.log_softmax(x / 0.7, -1)
    torch.testing.assert_close(tempered_entropy(x, 0.7), -(logp.exp() * logp).sum(-1), rtol=1e-12, atol=1e-12)


def test_the_graph_saves_only_the_inputs():
    """The plain formula keeps two more [K, V] tensors for its backward (the student's
    log-softmax and the teacher's probabilities); tempered_kl keeps only its inputs (the
    student's logits, which the model's graph holds anyway, and the teacher's)."""
    t, s = torch.randn(64, 1000), torch.randn(64, 1000, requires_grad=True)
    inputs = {t.data_ptr(), s.data_ptr()}
    for fn, extra in ((tempered_kl, 0), (lambda a, b: _reference(a, b, 1.0, "forward"), 2)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
            fn(t, s)
        assert sum(x.numel() >= t.numel() and x.data_ptr() not in inputs for x in saved) == extra


def test_the_teacher_gets_no_gradient_and_tiny_temperatures_stay_finite():
    t = torch.randn(4, 30, requires_grad=True)
    s = torch.randn(4, 30, requires_grad=True)
    for direction in ("forward", "reverse"):
        kl = tempered_kl(t, s, 1e-4, direction)
        assert torch.isfinite(kl).all() and (kl >= -1e-6).all()
        kl.sum().backward()
        assert t.grad is None and torch.isfinite(s.grad).all()


def test_bad_arguments():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="direction must be 'forward' or 'reverse'"):
        tempered_kl(x, x, 1.0, "sideways")
    with pytest.raises(ValueError, match="differ in shape"):
        tempered_kl(x, torch.zeros(2, 4))
    for bad in (0.0, -1.0, math.nan, math.inf):  # 0: NaN; -1: the KL of softmax(-x), plausible and wrong
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            tempered_kl(x, x, bad)
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            tempered_token_logprobs(x, torch.zeros(2, dtype=torch.int64), bad)
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            tempered_entropy(x, bad)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_cuda_blocks_match_the_formula(direction):
    g = torch.Generator(device="cuda").manual_seed(2)
    t = 3 * torch.randn(700, 50000, device="cuda", generator=g)
    s = (3 * torch.randn(700, 50000, device="cuda", generator=g)).requires_grad_()
    # The reference in float64: in float32 the reverse gradient's own rounding (log p - log p_t
    # nearly cancels KL where p is large) is 26x this tolerance, the blocks' 0.3-0.7x (CPU dry run
    # with the CUDA block size).
    s_ref = s.detach().double().requires_grad_()
    got, want = tempered_kl(t, s, 0.9, direction), _reference(t.double(), s_ref, 0.9, direction)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(s.grad.double(), s_ref.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_token_logprobs_match_the_formula():
    g = torch.Generator(device="cuda").manual_seed(3)
    x = (3 * torch.randn(700, 50000, device="cuda", generator=g)).requires_grad_()
    y = torch.randint(0, 50000, (700,), device="cuda", generator=g)
    x_ref = x.detach().clone().requires_grad_()
    got = tempered_token_logprobs(x, y, 0.9)
    want = tempered_log_softmax(x_ref, 0.9).gather(-1, y[:, None])[:, 0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_masked_vocabulary_entries_and_half_inputs(direction):
    """A token with -inf logits in both policies (a masked vocabulary entry) adds nothing and
    gives no NaN (the plain formula gave 0 * nan); half inputs are worked in float32."""
    g = torch.Generator().manual_seed(4)
    t, s = torch.randn(3, 9, generator=g, dtype=torch.float64), torch.randn(3, 9, generator=g, dtype=torch.float64)
    keep = torch.ones(9, dtype=torch.bool)
    keep[[0, 5]] = False
    masked = lambda x: x.masked_fill(~keep, -torch.inf)  # noqa: E731
    x = masked(s).requires_grad_()
    got = tempered_kl(masked(t), x, 0.8, direction)
    y = s[:, keep].clone().requires_grad_()
    want = _reference(t[:, keep], y, 0.8, direction)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    want.sum().backward()
    assert (x.grad[:, ~keep] == 0).all()
    torch.testing.assert_close(x.grad[:, keep], y.grad)
    assert torch.isfinite(tempered_entropy(masked(t))).all()
    for dtype in (torch.float16, torch.bfloat16):
        h = (1e4 * s).to(dtype).requires_grad_()
        kl = tempered_kl((1e4 * t).to(dtype), h, 0.8, direction)
        assert kl.dtype == dtype and torch.isfinite(kl).all()
        kl.sum().backward()
        assert torch.isfinite(h.grad).all()


@pytest.mark.parametrize("temperature", [1.0, 0.7, 3.0])
@pytest.mark.parametrize("block_rows", [1, 3, None], ids=["row", "3rows", "all"])
@pytest.mark.parametrize("shape", [(7, 11), (2, 5, 13), (0, 9)], ids=["KV", "BRV", "empty"])
def test_token_logprobs_are_the_gathered_log_softmax(monkeypatch, temperature, block_rows, shape):
    """The same values, bit for bit, as the sampler's log-softmax gathered (the replay must give
    the sampler's log-probs), and the same gradient, whatever the block size."""
    if block_rows is not None:
        monkeypatch.setattr(vocab_kl, "CPU_BLOCK", block_rows * shape[-1])
    g = torch.Generator().manual_seed(5)
    x = (3 * torch.randn(shape, generator=g, dtype=torch.float64)).requires_grad_()
    y = torch.randint(0, shape[-1], shape[:-1], generator=g)
    x_ref = x.detach().clone().requires_grad_()
    got = tempered_token_logprobs(x, y, temperature)
    want = tempered_log_softmax(x_ref, temperature).gather(-1, y[..., None])[..., 0]
    assert got.shape == y.shape and got.dtype == torch.float64 and torch.equal(got, want)
    w = torch.randn(shape[:-1], generator=g, dtype=torch.float64)
    (got * w).sum().backward()
    (want * w).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-14)
    if x.numel():
        z = x.detach().requires_grad_()
        assert torch.autograd.gradcheck(lambda z: tempered_token_logprobs(z, y, temperature), (z,))
    f32 = x.detach().float()
    assert torch.equal(tempered_token_logprobs(f32, y, temperature),
                       tempered_log_softmax(f32, temperature).gather(-1, y[..., None])[..., 0])


def test_token_logprobs_save_only_the_inputs_and_take_masks_halves_and_tiny_temperatures():
    x, y = torch.randn(64, 1000, requires_grad=True), torch.randint(0, 1000, (64,))
    for fn, extra in ((tempered_token_logprobs, 0), (lambda a, b: tempered_log_softmax(a, 1.0).gather(-1, b[:, None]), 1)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            fn(x, y)
        assert len({t.data_ptr() for t in saved if t.numel() >= x.numel()} - {x.data_ptr()}) == extra
    # A masked vocabulary entry (-inf) gets no gradient; a tiny temperature stays finite.
    g = torch.Generator().manual_seed(6)
    m = torch.randn(3, 9, generator=g).masked_fill(torch.arange(9) % 4 == 0, -torch.inf).requires_grad_()
    for temperature in (1.0, 1e-4):
        m.grad = None
        logp = tempered_token_logprobs(m, torch.tensor([1, 2, 3]), temperature)
        assert torch.isfinite(logp).all() and (logp <= 0).all()
        logp.sum().backward()
        assert torch.isfinite(m.grad).all() and (m.grad[:, ::4] == 0).all()
    for dtype in (torch.float16, torch.bfloat16):
        h = (1e4 * torch.randn(4, 30, generator=g)).to(dtype).requires_grad_()
        logp = tempered_token_logprobs(h, torch.arange(4), 0.8)
        assert logp.dtype == dtype and torch.isfinite(logp).all()
        logp.sum().backward()
        assert h.grad.dtype == dtype and torch.isfinite(h.grad).all()


def test_token_logprobs_bad_arguments():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="one target per row"):
        tempered_token_logprobs(x, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="must be int64"):
        tempered_token_logprobs(x, torch.zeros(2, dtype=torch.int32))
