"""The synthetic tasks: well-formed prompts, exact answers, rewards in [0, 1]."""

import pytest
import torch

from shadowkv.tasks import BOS, EOS, FILL, FIRST_SYMBOL, SEP, make_task


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_kv_lookup_answer_is_the_value_after_the_query_key():
    task = make_task("kv-lookup", length=128)
    prompts, answers = task.sample(20, _gen())
    for p, a in zip(prompts, answers):
        assert p.numel() >= 120 and p[0] == BOS and p[-2] == SEP and a[-1] == EOS
        hay = p[1:-2]
        i = int((hay == p[-1]).nonzero()[0])  # the query key occurs once in the haystack
        assert (hay == p[-1]).sum() == 1 and hay[i + 1] == a[0]
        assert (hay == FILL).sum() == hay.numel() - 2 * task.num_pairs


@pytest.mark.parametrize("value_len", [2, 3])
def test_kv_lookup_multi_token_values_continue_from_the_needle(value_len):
    task = make_task("kv-lookup", length=128, value_len=value_len)
    assert task.max_answer_len == value_len + 1
    prompts, answers = task.sample(20, _gen(4))
    for p, a in zip(prompts, answers):
        hay = p[1:-2]
        i = int((hay == p[-1]).nonzero()[0])
        assert a.numel() == value_len + 1 and torch.equal(hay[i + 1 : i + 1 + value_len], a[:-1])
        content = hay[hay != FILL]
        assert content.unique().numel() == content.numel()  # every answer token has one predecessor
    tokens, labels = task.demonstration(_gen(5))
    sep = int((tokens == SEP).nonzero()[0])
    assert tokens[-1] == EOS and labels[-1] == EOS
    shots, shot_labels = tokens[sep + 1 : -1].view(-1, value_len + 1), labels[sep + 1 : -1].view(-1, value_len + 1)
    assert torch.equal(shot_labels[:, 1:], shots[:, 1:])  # every value token is a target
    assert (shot_labels[:, 0] == -100).all() and (labels[: sep + 1] == -100).all()  # keys, haystack: context


def test_kv_lookup_rejects_too_many_value_tokens():
    from shadowkv.tasks import KVLookup

    with pytest.raises(ValueError, match="symbols"):
        KVLookup(num_symbols=16, num_pairs=8, value_len=2).sample(1, _gen())


def test_copy_and_chain_answers():
    copy = make_task("copy", length=40)
    (p,), (a,) = copy.sample(1, _gen(1))
    assert torch.equal(a[:-1], p[1 : 1 + copy.span]) and a[-1] == EOS
    chain = make_task("chain", length=40)
    (p,), (a,) = chain.sample(1, _gen(2))
    pairs = p[1:-2].view(-1, 2)
    f = {int(k): int(v) for k, v in pairs}
    x = int(p[-1])
    for hop in a[:-1].tolist():
        x = f[x]
        assert hop == x


def test_arithmetic_answers_are_running_sums_in_list_order():
    task = make_task("arithmetic", length=40)
    assert task.num_pairs == 18 and task.max_answer_len == 37
    prompts, answers = task.sample(10, _gen(6))
    for p, a in zip(prompts, answers):
        assert p.numel() == 40 and p[0] == BOS and p[-3:].tolist() == [EOS, SEP, BOS] and a[-1] == EOS
        pairs, echoed = p[1:-3].view(-1, 2), a[:-1].view(-1, 2)
        assert torch.equal(echoed[:, 0], pairs[:, 0]) and pairs[:, 0].unique().numel() == task.num_pairs
        digits = pairs[:, 1] - FIRST_SYMBOL
        assert ((digits >= 0) & (digits < task.modulus)).all() and (pairs[:, 0] >= FIRST_SYMBOL + task.modulus).all()
        assert torch.equal(echoed[:, 1] - FIRST_SYMBOL, digits.cumsum(0) % task.modulus)
    assert make_task("arithmetic", length=300).num_symbols >= 148 + 10  # keys and digits distinct
    short = task.curriculum(0.0, _gen(7))
    assert 2 <= short.num_pairs <= 4 and task.curriculum(0.5, _gen(7)).num_pairs <= task.num_pairs
    with pytest.raises(ValueError, match="modulus"):
        make_task("arithmetic", length=40, modulus=1).sample(1, _gen())


def test_arithmetic_rewards_the_sums_not_the_copied_keys():
    """Echoed keys were half the answer: copying the prompt's list scored ~0.56 without a sum."""
    task = make_task("arithmetic", length=12)  # 4 pairs: answer k1 s1 … k4 s4 EOS
    (p,), (a,) = task.sample(1, _gen(8))
    assert task.reward(a, a) == 1.0 and task.reward(a[:0], a) == 0.0
    copied = p[1:-3]  # k1 n1 … k4 n4: s1 = n1 is the only sum it gets right
    assert task.reward(copied, a) == pytest.approx(1 / 5)
    keys_wrong = a.clone()
    keys_wrong[0::2][:-1] = 0  # every key wrong, every sum and the EOS right
    assert task.reward(keys_wrong, a) == 1.0
    assert task.reward(a[:4], a) == pytest.approx(2 / 5)  # s1 and s2 of a cut-off answer


@pytest.mark.parametrize("name", ["kv-lookup", "copy", "chain", "arithmetic"])
def test_demonstrations_label_only_answers(name):
    task = make_task(name, length=48)
    tokens, labels = task.demonstration(_gen(3))
    keep = labels != -100
    assert keep.any() and torch.equal(labels[keep], tokens[keep]) and labels[-1] == EOS


def test_reward_is_positional_exact_match():
    task = make_task("copy", length=10)
    ans = torch.tensor([5, 6, 7, EOS])
    assert task.reward(ans, ans) == 1.0
    assert task.reward(torch.tensor([5, 9, 7]), ans) == 0.5
    assert task.reward(torch.tensor([], dtype=torch.long), ans) == 0.0


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task"):
        make_task("sudoku")
