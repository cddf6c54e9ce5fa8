import math

import pytest
import torch

from training.losses import (advantages, expert_rank_loss, mean_token_logprob, next_token_loss, supervised_samples,
                             tier_order_agreement, token_logprobs)


def test_reward_scale_cancels_under_zscore_but_not_centered():
    rewards = [[1.0, 0.5, 0.0], [2.0, 1.0, 0.0], [0.5, 0.25, 0.0]]
    zscores = [advantages(r, "zscore") for r in rewards]
    for z in zscores:
        assert z == pytest.approx([math.sqrt(1.5), 0.0, -math.sqrt(1.5)])  # +-1.2247
    centered = [advantages(r, "centered") for r in rewards]
    assert centered[0] == pytest.approx([0.5, 0.0, -0.5])
    assert centered[1] == pytest.approx([1.0, 0.0, -1.0])
    assert centered[2] == pytest.approx([0.25, 0.0, -0.25])
    assert advantages([3.0, 1.0], "raw") == [3.0, 1.0]
    assert advantages([1.0], "zscore") == [0.0]  # std 0 -> A = 0


def test_hand_computed_rank_loss_with_masking_and_different_lengths():
    # two samples, vocabulary of 2 so the log-probs are easy to write down
    labels = torch.tensor([[-100, 0, 1, -100],   # sample 0: 2 supervised targets (positions 1, 2)
                           [-100, -100, -100, 1]])  # sample 1: 1 supervised target (position 3)
    p = {1: [0.9, 0.8, 0.7], 2: [0.6, 0.5, 0.4], 3: [0.3, 0.2, 0.1]}  # prob of the right token per target

    def logits_for(probs):
        # target at positions 1, 2 (sample 0) and 3 (sample 1) is predicted from the position before it
        logits = torch.zeros(2, 4, 2)
        for (b, t, target), q in zip([(0, 0, 0), (0, 1, 1), (1, 2, 1)], probs):
            logit = math.log(q / (1 - q))
            logits[b, t, target] = logit
        return logits

    lbar = {}
    for tier, probs in p.items():
        logprobs, mask = token_logprobs(logits_for(probs), labels)
        lbar[tier] = mean_token_logprob(logprobs, mask)
    expected_lbar = {t: [(math.log(q[0]) + math.log(q[1])) / 2, math.log(q[2])] for t, q in p.items()}
    for tier in p:
        assert lbar[tier].tolist() == pytest.approx(expected_lbar[tier], rel=1e-6)
    a = advantages([1.0, 0.5, 0.0])
    loss = expert_rank_loss(lbar, a, torch.tensor([True, True]))
    expected = -sum(sum(a[t - 1] * expected_lbar[t][b] for t in p) for b in range(2)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert tier_order_agreement(lbar, torch.tensor([True, True])) == 1.0


def test_no_supervised_tokens_gives_zero_not_nan():
    logits = torch.randn(2, 5, 7)
    labels = torch.full((2, 5), -100)
    logprobs, mask = token_logprobs(logits, labels)
    assert next_token_loss(logprobs, mask).item() == 0.0
    lbar = mean_token_logprob(logprobs, mask)
    assert torch.equal(lbar, torch.zeros(2))
    assert expert_rank_loss({1: lbar, 2: lbar}, [1.0, -1.0], mask.any(-1)).item() == 0.0


def test_rank_loss_floor_stops_pushing_the_bottom_tier_down():
    lbar_low = torch.tensor([-20.0], requires_grad=True)
    loss = expert_rank_loss({2: lbar_low}, [1.0, -1.0], torch.tensor([True]), floor=-10.0)
    loss.backward()
    assert lbar_low.grad.item() == 0.0


def test_packed_segments_give_per_sample_means():
    """Two rows holding three packed samples: Lbar per sample, as if each had its own row."""
    logprobs = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-5.0, -6.0, -7.0, -8.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False, True], [True, True, True, False]])
    segments = torch.tensor([[0, 0, 1, 1], [2, 2, 2, -1]])
    lbar = mean_token_logprob(logprobs, mask, segments, num_samples=3)
    assert lbar.tolist() == [-1.5, -4.0, -6.0]
    assert supervised_samples(mask, segments, num_samples=3).tolist() == [True, True, True]
    assert supervised_samples(mask & (segments != 1), segments, num_samples=3).tolist() == [True, False, True]
    lbar.sum().backward()
    assert logprobs.grad[0].tolist() == [0.5, 0.5, 0.0, 1.0]
