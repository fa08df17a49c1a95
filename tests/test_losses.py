"""The training losses and repetition measures on small tensors, against values worked out by hand."""
import math
import random

import pytest
import torch

from training import collect, evaluate
from training.collect import augment_states, repeats
from training.losses import (ar_cross_entropy, first_wrong, hard_ce, jacobi_gain, penalize_loops, repeat_completions,
                             soft_kl, unlikelihood)
from training.packing import noise_level

from training_fixtures import loop_tokens


def test_losses_by_hand():
    teacher = torch.tensor([[0.0, 0.0]])  # p = (1/2, 1/2)
    student = torch.tensor([[0.0, math.log(3.0)]])  # q = (1/4, 3/4)
    # KL = 1/2 ln(2) + 1/2 ln(2/3) = 1/2 ln(4/3)
    assert soft_kl(teacher, student).item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    assert soft_kl(student, student).item() == pytest.approx(0.0, abs=1e-7)
    assert ar_cross_entropy(student, torch.tensor([1])).item() == pytest.approx(-math.log(0.75), abs=1e-6)
    # label smoothing 0.1 over 2 classes: 0.95 * -ln(3/4) + 0.05 * -ln(1/4)
    want = 0.95 * -math.log(0.75) + 0.05 * -math.log(0.25)
    assert ar_cross_entropy(student, torch.tensor([1]), 0.1).item() == pytest.approx(want, abs=1e-6)
    assert soft_kl(teacher[:0], student[:0]).item() == 0.0
    # weighted mean: weights (1, 0) keep the first row's KL; (1, 3) give (1 * KL1 + 3 * 0) / 4
    two_t, two_s = torch.cat([teacher, student]), torch.cat([student, student])
    assert soft_kl(two_t, two_s, torch.tensor([1.0, 0.0])).item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    assert soft_kl(two_t, two_s, torch.tensor([1.0, 3.0])).item() == pytest.approx(0.125 * math.log(4 / 3), abs=1e-6)
    assert soft_kl(two_t, two_s, torch.zeros(2)).item() == 0.0
    # hard consistency: the student's cross-entropy on the teacher's argmax (row 1: token 1 of q, row 2: token 1 too)
    sharp = torch.tensor([[0.0, 5.0], [0.0, 1.0]])
    assert hard_ce(sharp, two_s).item() == pytest.approx(-math.log(0.75), abs=1e-6)
    assert hard_ce(torch.tensor([[2.0, 0.0]]), student).item() == pytest.approx(-math.log(0.25), abs=1e-6)
    assert hard_ce(sharp, two_s, torch.tensor([0.0, 2.0])).item() == pytest.approx(-math.log(0.75), abs=1e-6)
    assert hard_ce(teacher[:0], student[:0]).item() == 0.0
    # unlikelihood: -ln(1 - q(loop tokens)); row 1 marks token 1 (q = 3/4), row 2 nothing (0), mean over the rows
    loops = torch.tensor([[False, True], [False, False]])
    assert unlikelihood(two_s, loops).item() == pytest.approx(0.5 * -math.log(0.25), abs=1e-6)
    assert unlikelihood(two_s, torch.ones(2, 2, dtype=torch.bool)).item() == pytest.approx(-math.log(1e-6), rel=1e-3)  # capped
    assert unlikelihood(two_s[:0], loops[:0]).item() == 0.0
    grad = torch.zeros(1, 2, requires_grad=True)  # it lowers the marked token's logit
    unlikelihood(grad, torch.tensor([[False, True]])).backward()
    assert grad.grad[0, 1] > 0 > grad.grad[0, 0]


def test_first_wrong_gain_noise():
    fixed = torch.tensor([5, 6, 7, 8])
    states = torch.tensor([[5, 6, 0, 0], [1, 6, 7, 8], [5, 6, 7, 8]])
    assert first_wrong(states, fixed.expand(3, 4)).tolist() == [2, 0, 4]
    assert noise_level(states, fixed).tolist() == [0.5, 1.0, 0.0]
    pred = torch.tensor([[5, 6, 7, 0]])
    assert jacobi_gain(pred, states[:1], fixed[None]).tolist() == [1.0]


def test_repeats_and_augment():
    assert repeats([1] * 10, 10)
    assert not repeats([1] * 9 + [2], 10)
    assert repeats([3, 4] * 10, 10, max_period=2)
    assert not repeats([3, 4] * 10, 10, max_period=1)
    # where the loop begins: the first token of the run the filter catches, the earliest-completed one if several
    assert collect.loop_onset([7, 8] + [1] * 10 + [2], 10) == 2
    assert collect.loop_onset([5] + [3, 4] * 10, 10, max_period=2) == 1
    assert collect.loop_onset([5, 6] + [1] * 12 + [3, 4] * 10, 10, max_period=2) == 2  # the 1s complete first
    assert collect.loop_onset([1] * 9 + [2], 10) is None
    got = evaluate.repetition([[7, 8] + [1] * 10, [1, 2, 3, 4, 5]])
    assert got["filter_rate"] == 0.5 and got["per_answer"]["loop_onset"] == [2, None]
    assert got["per_answer"]["tokens"] == [12, 5] and got["per_answer"]["seq_rep_4"][1] == 0.0
    fixed = torch.tensor([1, 2, 3, 4, 5, 6])
    states = torch.stack([torch.tensor([1, 9, 9, 9, 9, 9]), fixed])
    aug = augment_states(states, fixed, 5, torch.Generator().manual_seed(0))
    assert aug.shape == (5, 6)
    assert (aug[:, :2] == torch.tensor([1, 9])).all()  # the first wrong token stays: same noise level


def test_loop_penalty_by_hand():
    # row: a pad (0), then 5 6 7 8 5 6 7 and a pad. After "... 5 6 7" (position 7) token 8 would repeat "5 6 7 8".
    ids = torch.tensor([[0, 5, 6, 7, 8, 5, 6, 7, 0]])
    real = torch.tensor([[False] + [True] * 7 + [False]])
    got = repeat_completions(ids, real, torch.arange(9), 10)
    assert [set(torch.nonzero(r).flatten().tolist()) for r in got[0]] == [set()] * 7 + [{8}, set()]
    assert penalize_loops(torch.zeros(1, 3), torch.tensor([[False, True, False]]), 2.0).tolist() == [[0.0, -2.0, 0.0]]
    rng = random.Random(0)  # small vocabularies repeat often: against the oracle, pads on both sides
    for _ in range(100):
        S = rng.randrange(1, 25)
        ids = torch.tensor([[rng.randrange(3) for _ in range(S)] for _ in range(2)])
        real = torch.zeros(2, S, dtype=torch.bool)
        for b in range(2):
            lo = rng.randrange(S // 2 + 1)
            real[b, lo:rng.randrange(lo, S) + 1] = True
        got = repeat_completions(ids, real, torch.arange(S), 3)
        for b in range(2):
            for j in real[b].nonzero().flatten().tolist():
                seq = [int(ids[b, q]) for q in range(j + 1) if real[b, q]]
                assert set(got[b, j].nonzero().flatten().tolist()) == loop_tokens(seq)


def test_seq_rep_counts_repeated_four_grams():
    from training.collect import seq_rep

    assert seq_rep([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 / 5)  # 5 four-grams, (1, 2, 3, 4) twice
    assert seq_rep([5, 5, 5, 5, 5]) == pytest.approx(1 / 2) and seq_rep([1, 2, 3]) == 0.0
