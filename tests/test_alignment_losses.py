"""The alignment losses (pairwise, DPO, KL, shaped reward, KL controller, GAE, whitening, PPO, explained
variance, entropy) against values worked by hand."""

import math

import pytest
import torch

from tinygpt.losses import (adaptive_kl_coef, dpo_loss, entropy_from_logits, explained_variance, gae, kl_penalty,
                            masked_mean, pairwise_loss, ppo_losses, shaped_rewards, whiten)


def _nls(m: float) -> float:
    """-log sigmoid(m) = log(1 + exp(-m))."""
    return math.log1p(math.exp(-m))


def test_pairwise_loss_hand_worked():
    """margins r_c - r_r = 2, 0, -1:
    -log sigmoid(2) = log(1 + e^-2) = 0.126928, -log sigmoid(0) = log 2 = 0.693147, -log sigmoid(-1) = log(1 + e) = 1.313262.
    plain mean = 2.133337 / 3 = 0.711112.
    grouped (prompt 7 has the first two pairs, prompt 9 the third): ((0.126928 + 0.693147) / 2 + 1.313262) / 2 = 0.861650.
    """
    chosen = torch.tensor([2.0, 1.0, 0.0])
    rejected = torch.tensor([0.0, 1.0, 1.0])
    assert pairwise_loss(chosen, rejected).item() == pytest.approx(0.711112, abs=1e-6)
    grouped = pairwise_loss(chosen, rejected, group=torch.tensor([7, 7, 9]))
    assert grouped.item() == pytest.approx(0.861650, abs=1e-6)
    assert grouped.item() == pytest.approx(((_nls(2) + _nls(0)) / 2 + _nls(-1)) / 2, abs=1e-6)


def test_pairwise_loss_gradient_and_stability():
    """d/dr_c of -log sigmoid(r_c - r_r) = -sigmoid(r_r - r_c): -0.5 at margin 0; a huge margin gives 0 loss, not NaN."""
    chosen = torch.tensor([0.0], requires_grad=True)
    pairwise_loss(chosen, torch.tensor([0.0])).backward()
    assert chosen.grad.item() == pytest.approx(-0.5)
    assert pairwise_loss(torch.tensor([1e4]), torch.tensor([-1e4])).item() == 0.0
    assert pairwise_loss(torch.tensor([-1e4]), torch.tensor([1e4])).item() == pytest.approx(2e4)


def test_pairwise_loss_each_prompt_counts_once():
    """A prompt with 6 identical pairs weighs as much as a prompt with 1 pair."""
    chosen = torch.tensor([1.0] * 6 + [-1.0])
    rejected = torch.zeros(7)
    group = torch.tensor([0] * 6 + [1])
    expected = (_nls(1.0) + _nls(-1.0)) / 2
    assert pairwise_loss(chosen, rejected, group).item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="one id per pair"):
        pairwise_loss(chosen, rejected, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="at least one"):
        pairwise_loss(torch.zeros(0), torch.zeros(0))


def test_dpo_loss_hand_worked():
    """beta 0.1; policy logps chosen -10, rejected -12; reference -11 and -11.
    chosen log-ratio = +1, rejected = -1 -> implicit rewards 0.1 and -0.1;
    loss = -log sigmoid(0.1 * (1 - (-1))) = log(1 + e^-0.2) = 0.598139."""
    loss, chosen_r, rejected_r = dpo_loss(torch.tensor([-10.0]), torch.tensor([-12.0]),
                                          torch.tensor([-11.0]), torch.tensor([-11.0]), beta=0.1)
    assert loss.item() == pytest.approx(0.598139, abs=1e-6)
    assert chosen_r.item() == pytest.approx(0.1) and rejected_r.item() == pytest.approx(-0.1)
    assert not chosen_r.requires_grad


def test_dpo_loss_matches_the_papers_formula():
    """Eq. 7 of Rafailov et al. written out: -E log sigma(beta log(pi(yw)/pi_ref(yw)) - beta log(pi(yl)/pi_ref(yl)))."""
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-20 * torch.rand(16, generator=g) for _ in range(4))
    pc.requires_grad_(True)
    beta = 0.3
    loss, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta)
    paper = -torch.log(torch.sigmoid(beta * torch.log(pc.exp() / rc.exp()) - beta * torch.log(pr.exp() / rr.exp()))).mean()
    assert torch.allclose(loss, paper, atol=1e-5)
    assert torch.allclose(chosen_r, beta * (pc - rc).detach()) and torch.allclose(rejected_r, beta * (pr - rr))
    loss.backward()
    # d loss / d pc_i = -beta * sigmoid(-beta * margin_i) / P: raising a chosen log-prob always lowers the loss
    margin = (pc - rc) - (pr - rr)
    assert torch.allclose(pc.grad, -beta * torch.sigmoid(-beta * margin.detach()) / 16, atol=1e-6)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(pc, pr, rc, rr, beta=0.0)


def test_kl_penalty_hand_worked():
    """p = 0.5, p_ref = 0.25: log ratio = log 2 = 0.693147 (k1); k2 = 0.693147^2 / 2 = 0.240227;
    k3 with r = p_ref / p = 0.5: (0.5 - 1) - log 0.5 = 0.193147."""
    logp, ref = torch.log(torch.tensor([[0.5]])), torch.log(torch.tensor([[0.25]]))
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(0.693147, abs=1e-6)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.240227, abs=1e-6)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.193147, abs=1e-6)
    assert kl_penalty(logp, ref).shape == (1, 1)
    with pytest.raises(ValueError, match="k1, k2 or k3"):
        kl_penalty(logp, ref, "k4")


def test_kl_estimators_k1_and_k3_are_unbiased():
    """Averaged over tokens drawn from p (here: exact expectation), k1 and k3 both equal KL(p || q)."""
    p = torch.tensor([0.7, 0.2, 0.1])
    q = torch.tensor([0.4, 0.4, 0.2])
    kl = (p * (p / q).log()).sum()
    for kind in ("k1", "k3"):
        est = (p * kl_penalty(p.log()[None], q.log()[None], kind)[0]).sum()
        assert est.item() == pytest.approx(kl.item(), abs=1e-6), kind


def test_gae_hand_worked():
    """Row 0: gamma 1, lam 0.5, rewards (0, 1, 5), values (0.5, 0.2, 9), mask (1, 1, 0): token 2 is padding.
      t=1: next token is padding -> bootstrap 0: delta = 1 - 0.2 = 0.8, A = 0.8
      t=0: delta = 0 + 0.2 - 0.5 = -0.3, A = -0.3 + 0.5 * 0.8 = 0.1
      returns = A + V = (0.6, 1.0, 0 (masked)).
    Row 1: gamma 0.9, lam 0.95 is checked below with rewards (1, 2), values 0: A1 = 2, A0 = 1 + 0.9*0.95*2 = 2.71.
    """
    adv, ret = gae(torch.tensor([[0.0, 1.0, 5.0]]), torch.tensor([[0.5, 0.2, 9.0]]), torch.tensor([[1, 1, 0]]),
                   gamma=1.0, lam=0.5)
    assert torch.allclose(adv, torch.tensor([[0.1, 0.8, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[0.6, 1.0, 0.0]]), atol=1e-6)
    adv, ret = gae(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2), torch.ones(1, 2), gamma=0.9, lam=0.95)
    assert torch.allclose(adv, torch.tensor([[2.71, 2.0]]), atol=1e-6)


def test_gae_ignores_prompt_and_padding_and_matches_a_loop():
    """A prompt prefix (mask 0) and padding do not change the response tokens' advantages."""
    g = torch.Generator().manual_seed(1)
    r, v = torch.randn(1, 4, generator=g), torch.randn(1, 4, generator=g)
    adv, _ = gae(r, v, torch.ones(1, 4), gamma=0.95, lam=0.9)
    r2 = torch.cat([torch.randn(1, 2, generator=g), r, torch.randn(1, 3, generator=g)], 1)  # 2 prompt, 4 response, 3 pad
    v2 = torch.cat([torch.randn(1, 2, generator=g), v, torch.randn(1, 3, generator=g)], 1)
    m2 = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0, 0]])
    adv2, _ = gae(r2, v2, m2, gamma=0.95, lam=0.9)
    assert torch.allclose(adv2[:, 2:6], adv, atol=1e-6)
    assert adv2[0, :2].abs().sum() == 0 and adv2[0, 6:].abs().sum() == 0
    # the textbook loop: A_t = sum_l (gamma lam)^l delta_{t+l}, V after the end = 0
    vals = v[0].tolist() + [0.0]
    deltas = [r[0, t].item() + 0.95 * vals[t + 1] - vals[t] for t in range(4)]
    expected = [sum((0.95 * 0.9) ** k * deltas[t + k] for k in range(4 - t)) for t in range(4)]
    assert torch.allclose(adv[0], torch.tensor(expected), atol=1e-5)


def test_whiten_hand_worked():
    """x = (1, 3, 100), mask (1, 1, 0): mean 2, variance ((1-2)^2 + (3-2)^2) / 2 = 1 -> (-1, 1, 0);
    without shifting the mean: (1, 3, 0)."""
    x, m = torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[1, 1, 0]])
    assert torch.allclose(whiten(x, m), torch.tensor([[-1.0, 1.0, 0.0]]), atol=1e-6)
    assert torch.allclose(whiten(x, m, shift_mean=False), torch.tensor([[1.0, 3.0, 0.0]]), atol=1e-6)


def _summing_workers(n: int):
    """``n`` reduce functions for ``n`` threads: each returns the sum of what all of them passed in,
    as ``torch.distributed.all_reduce`` would across ranks (same order everywhere)."""
    import threading

    barrier, parts = threading.Barrier(n), [None] * n

    def make(i):
        def reduce(t):
            parts[i] = t.clone()
            barrier.wait()
            total = sum(parts[j] for j in range(n))
            barrier.wait()  # every worker has read before the next call overwrites
            return total
        return reduce
    return [make(i) for i in range(n)]


def test_reduced_statistics_over_workers_equal_those_of_the_whole_batch():
    """Two workers holding rows 0-1 and 2-4 of one batch whiten (and average, and take the entropy)
    as one process holding all five rows does: the statistics are over every worker's masked tokens."""
    import threading

    torch.manual_seed(0)
    x, logits = torch.randn(5, 6) * 3 + 1, torch.randn(5, 6, 7)
    mask = (torch.rand(5, 6) > 0.3).float()
    mask[:, 0] = 1.0
    splits = [slice(0, 2), slice(2, 5)]  # unequal halves: a plain mean of the two means would be wrong
    results: list = [None, None]

    def work(i, reduce):
        rows = splits[i]
        results[i] = (whiten(x[rows], mask[rows], reduce=reduce),
                      whiten(x[rows], mask[rows], shift_mean=False, reduce=reduce),
                      masked_mean(x[rows], mask[rows], reduce), masked_mean(x[rows], None, reduce),
                      entropy_from_logits(logits[rows], mask[rows], reduce))

    threads = [threading.Thread(target=work, args=(i, r)) for i, r in enumerate(_summing_workers(2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.allclose(torch.cat([results[0][0], results[1][0]]), whiten(x, mask), atol=1e-5)
    assert torch.allclose(torch.cat([results[0][1], results[1][1]]), whiten(x, mask, shift_mean=False), atol=1e-5)
    for worker in results:
        assert torch.allclose(worker[2], masked_mean(x, mask), atol=1e-6)
        assert torch.allclose(worker[3], x.mean(), atol=1e-6)
        assert torch.allclose(worker[4], entropy_from_logits(logits, mask), atol=1e-6)
    assert not torch.allclose(whiten(x[:2], mask[:2]), whiten(x, mask)[:2], atol=1e-3)  # alone, a worker differs


def test_ppo_losses_hand_worked():
    """Three response tokens (a fourth is padding), clip_ratio 0.2, value_clip 0.2.
    token a: ratio 1.5, A = 1:  -A*r = -1.5, clipped -1.2 -> max -1.2 (clipped branch)
    token b: ratio 0.5, A = 1:  -0.5, clipped -0.8 -> -0.5 (unclipped)
    token c: ratio 0.5, A = -2: 1.0, clipped 1.6 -> 1.6 (clipped)
    policy_loss = (-1.2 - 0.5 + 1.6) / 3 = -0.033333; clip_frac = 2/3.
    values V = (1, 0, 0.5), old (0.5, 0, 0.5), returns (0, 1, 0.5):
    a: (1-0)^2 = 1 vs clipped V 0.7: 0.49 -> 1; b: 1 vs 1 -> 1; c: 0 -> value_loss = 0.5 * 2/3 = 0.333333.
    approx_kl (k3, r = pi/pi_old): a: 0.5 - log 1.5 = 0.094535; b, c: -0.5 + log 2 = 0.193147 -> 0.160276.
    Gradient: only token b's (unclipped) term depends on logprobs: d/dlogp_b = -A*r/3 = -0.5/3."""
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 0.5, 7.0]])).requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, -2.0, 50.0]])
    values = torch.tensor([[1.0, 0.0, 0.5, 3.0]], requires_grad=True)
    old_values = torch.tensor([[0.5, 0.0, 0.5, 0.0]])
    returns = torch.tensor([[0.0, 1.0, 0.5, -9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    out = ppo_losses(logp, old, adv, values, old_values, returns, mask, clip_ratio=0.2, value_clip=0.2)
    assert out["policy_loss"].item() == pytest.approx(-0.1 / 3, abs=1e-6)
    assert out["clip_frac"].item() == pytest.approx(2 / 3, abs=1e-6)
    assert out["value_loss"].item() == pytest.approx(1 / 3, abs=1e-6)
    assert out["value_clip_frac"].item() == 0.0
    assert out["approx_kl"].item() == pytest.approx(0.160276, abs=1e-6)
    (out["policy_loss"] + out["value_loss"]).backward()
    assert torch.allclose(logp.grad, torch.tensor([[0.0, -0.5 / 3, 0.0, 0.0]]), atol=1e-6)
    # value grad: a: 0.5 * 2 * (1 - 0) / 3 = 1/3; b: 0.5 * 2 * (0 - 1) / 3 = -1/3; c: 0; padding 0
    assert torch.allclose(values.grad, torch.tensor([[1 / 3, -1 / 3, 0.0, 0.0]]), atol=1e-6)


def test_ppo_value_clipping_takes_the_pessimistic_branch():
    """V moved from 0 to 1 (old 0, return 2, clip 0.2): unclipped (1-2)^2 = 1, clipped (0.2-2)^2 = 3.24 -> 0.5 * 3.24."""
    out = ppo_losses(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1, 1),
                     torch.full((1, 1), 2.0), torch.ones(1, 1), clip_ratio=0.2, value_clip=0.2)
    assert out["value_loss"].item() == pytest.approx(1.62, abs=1e-6)
    assert out["value_clip_frac"].item() == 1.0
    with pytest.raises(ValueError, match="share one"):
        ppo_losses(torch.zeros(1, 2), torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1, 1),
                   torch.zeros(1, 1), torch.ones(1, 1))


def test_entropy_and_masked_mean_hand_worked():
    """Logits (0, 0): H = log 2 = 0.693147; logits (log 3, 0): p = (3/4, 1/4), H = 0.215762 + 0.346574 = 0.562335.
    The third position is masked out."""
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [100.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert entropy_from_logits(logits, mask).item() == pytest.approx((0.693147 + 0.562335) / 2, abs=1e-6)
    assert masked_mean(torch.tensor([[1.0, 2.0, 9.0]]), mask).item() == pytest.approx(1.5)
    assert masked_mean(torch.tensor([[1.0]]), torch.tensor([[0]])).item() == 0.0  # nothing counts: 0, not NaN


def test_preference_accuracy_counts_ties_half():
    """chosen 2 > 1: 1; chosen 0 < 3: 0; tie 5 == 5: 1/2."""
    from tinygpt.losses import preference_accuracy

    got = preference_accuracy(torch.tensor([2.0, 0.0, 5.0]), torch.tensor([1.0, 3.0, 5.0]))
    assert torch.equal(got, torch.tensor([1.0, 0.0, 0.5]))


def test_shaped_rewards_hand_worked():
    """r_t = -beta * KL_t on response tokens, plus the RM score on each answer's last token."""
    scores = torch.tensor([1.0, -2.0])
    kl = torch.tensor([[0.5, -0.25, 1.0], [2.0, 5.0, -3.0]])  # row 1's 5 and -3 are off the mask
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    got = shaped_rewards(scores, kl * mask, mask, kl_coef=0.1)
    want = torch.tensor([[-0.05, 0.025, -0.1 + 1.0], [-0.2 - 2.0, 0.0, 0.0]])
    assert torch.allclose(got, want)
    # KL off the mask never leaks in, even if the caller forgot to mask it
    assert torch.allclose(shaped_rewards(scores, kl, mask, 0.1), want)
    with pytest.raises(ValueError, match="no response token"):
        shaped_rewards(scores, kl, torch.tensor([[1.0, 0, 0], [0, 0, 0]]), 0.1)
    with pytest.raises(ValueError, match="shaped_rewards"):
        shaped_rewards(scores[:1], kl, mask, 0.1)


def test_adaptive_kl_coef_hand_worked():
    """beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon), target 6, horizon 100, n 10."""
    assert adaptive_kl_coef(0.1, 12.0, 6.0, 10, 100) == pytest.approx(0.1 * 1.02)   # error 1 -> clipped 0.2
    assert adaptive_kl_coef(0.1, 6.6, 6.0, 10, 100) == pytest.approx(0.1 * 1.01)    # error 0.1
    assert adaptive_kl_coef(0.101, 0.0, 6.0, 10, 100) == pytest.approx(0.09898)     # error -1 -> clipped -0.2
    assert adaptive_kl_coef(0.1, 6.0, 6.0, 10, 100) == 0.1                           # on target: unchanged
    with pytest.raises(ValueError):
        adaptive_kl_coef(0.1, 1.0, 0.0, 10, 100)


def test_explained_variance_hand_worked():
    returns = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    # values 2 everywhere: Var(returns - 2) = Var(returns) -> 0
    assert explained_variance(torch.full_like(returns, 2.0), returns, mask) == pytest.approx(0.0)
    # residuals (0.5, 0, -0.5): variance 1/6 against 2/3 -> 1 - 1/4
    values = torch.tensor([[0.5, 2.0, 3.5, 0.0]])
    assert explained_variance(values, returns, mask) == pytest.approx(0.75)
    assert math.isnan(explained_variance(returns, torch.ones_like(returns), mask))
