"""optim.py: the schedule's shape at hand-picked steps and the decay groups."""

import math

import torch
from torch import nn

from tinygpt.optim import lr_at, make_optimizer, param_groups


def test_schedule_warmup_then_cosine():
    kw = dict(max_lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    assert lr_at(0, **kw) == 0.1          # (0 + 1) / 10: the first step already moves
    assert lr_at(9, **kw) == 1.0          # end of warmup
    assert lr_at(10, **kw) == 1.0         # cosine starts at the peak
    assert math.isclose(lr_at(60, **kw), 0.1 + 0.5 * 0.9)  # half-way: cos(pi/2) = 0
    assert lr_at(110, **kw) == 0.1 and lr_at(500, **kw) == 0.1
    lrs = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay


def test_schedule_without_warmup():
    assert lr_at(0, max_lr=2.0, min_lr=0.0, warmup_steps=0, total_steps=10) == 2.0


def test_param_groups_decay_matrices_only():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.LayerNorm(4))
    model[1].bias.requires_grad_(False)  # frozen params are left out
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {tuple(p.shape) for p in decay["params"]} == {(10, 4), (4, 4)}
    assert {tuple(p.shape) for p in no_decay["params"]} == {(4,)}  # LayerNorm weight and bias
    assert len(no_decay["params"]) == 2


def test_no_decay_params_are_not_decayed():
    p_bias = nn.Parameter(torch.ones(3))
    model = nn.Module()
    model.b = p_bias
    opt = make_optimizer(model, lr=0.1, weight_decay=0.5)
    p_bias.grad = torch.zeros(3)
    opt.step()
    assert torch.equal(p_bias.detach(), torch.ones(3))  # zero grad, no decay: unchanged
