"""losses.py against values worked out by hand."""

import math

import torch

from tinygpt.losses import lm_loss, sequence_logprobs, token_logprobs


def test_lm_loss_hand_worked():
    # Two positions, vocab 2. Logits (0, 0): p = 1/2 -> -log p = log 2.
    # Logits (log 3, 0) with target 0: p = 3/4 -> -log(3/4).
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])
    targets = torch.tensor([[1, 0]])
    expected = (math.log(2.0) - math.log(0.75)) / 2
    assert torch.isclose(lm_loss(logits, targets), torch.tensor(expected), atol=1e-6)


def test_lm_loss_mask_and_ignore_index():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])
    targets = torch.tensor([[1, 0]])
    # mask keeps only the second position
    assert torch.isclose(lm_loss(logits, targets, torch.tensor([[0, 1]])), torch.tensor(-math.log(0.75)), atol=1e-6)
    # -100 targets are ignored the same way
    assert torch.isclose(lm_loss(logits, torch.tensor([[-100, 0]])), torch.tensor(-math.log(0.75)), atol=1e-6)


def test_lm_loss_empty_mask_is_zero_not_nan():
    logits = torch.zeros(1, 3, 5, requires_grad=True)
    loss = lm_loss(logits, torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3))
    assert loss.item() == 0.0
    loss.backward()  # a gradient path exists
    assert logits.grad is not None


def test_lm_loss_bf16_logits_computed_in_fp32():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    targets = torch.randint(0, 7, (2, 4))
    ref = lm_loss(logits, targets)
    got = lm_loss(logits.bfloat16(), targets)
    assert got.dtype == torch.float32
    assert torch.isclose(got, ref, atol=2e-2)


def test_token_and_sequence_logprobs():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [0.0, math.log(4.0)]]])
    targets = torch.tensor([[0, 0, 1]])
    lp = token_logprobs(logits, targets)
    assert torch.allclose(lp, torch.tensor([[math.log(0.5), math.log(0.75), math.log(0.8)]]), atol=1e-6)
    seq = sequence_logprobs(logits, targets, torch.tensor([[0, 1, 1]]))
    assert torch.allclose(seq, torch.tensor([math.log(0.75) + math.log(0.8)]), atol=1e-6)
