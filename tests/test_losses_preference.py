"""Preference losses against their papers' formulas by hand, and against TRL's DPOTrainer."""

import math
import types

import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses.preference import bradley_terry, dpo_loss, sequence_logps

# Three pairs of sequence log-prob sums: (policy chosen, policy rejected, ref chosen, ref rejected).
PC = [-12.0, -30.5, -7.25]
PR = [-15.0, -28.0, -9.0]
RC = [-13.0, -29.0, -8.0]
RR = [-14.5, -29.5, -8.5]


def logsig(x):
    """log sigmoid(x), stable for both signs."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def mean(xs):
    return sum(xs) / len(xs)


def hand_h(reference_free=False):
    if reference_free:
        return [pc - pr for pc, pr in zip(PC, PR)]
    return [(pc - pr) - (rc - rr) for pc, pr, rc, rr in zip(PC, PR, RC, RR)]


def ours(**kw):
    arrs = [jnp.asarray(x, jnp.float32) for x in (PC, PR, RC, RR)]
    loss, metrics = dpo_loss(*arrs, **kw)
    return float(loss), {k: float(v) for k, v in metrics.items()}


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_dpo_sigmoid_is_eq7_with_conservative_smoothing(ls):
    beta = 0.1
    want = mean([-(1 - ls) * logsig(beta * h) - ls * logsig(-beta * h) for h in hand_h()])
    got, m = ours(beta=beta, loss_type="sigmoid", label_smoothing=ls)
    assert got == pytest.approx(want, rel=1e-6)
    assert m["loss"] == pytest.approx(want, rel=1e-6)


def test_dpo_ipo_is_eq17():
    beta = 0.5
    want = mean([(h - 1 / (2 * beta)) ** 2 for h in hand_h()])
    assert ours(beta=beta, loss_type="ipo")[0] == pytest.approx(want, rel=1e-6)


def test_dpo_hinge_is_slic():
    beta = 0.7  # h = (1.5, -3.0, 1.25) -> beta*h straddles 1, so both hinge sides are used
    want = mean([max(0.0, 1 - beta * h) for h in hand_h()])
    assert want > 0 and any(1 - beta * h < 0 for h in hand_h())
    assert ours(beta=beta, loss_type="hinge")[0] == pytest.approx(want, rel=1e-6)


def test_dpo_robust_is_chowdhury():
    beta, ls = 0.3, 0.2
    want = mean([(-(1 - ls) * logsig(beta * h) + ls * logsig(-beta * h)) / (1 - 2 * ls)
                 for h in hand_h()])
    got, _ = ours(beta=beta, loss_type="robust", label_smoothing=ls)
    assert got == pytest.approx(want, rel=1e-6)


def test_dpo_reference_free_ignores_reference():
    beta = 0.2
    want = mean([-logsig(beta * h) for h in hand_h(reference_free=True)])
    got, m = ours(beta=beta, reference_free=True)
    assert got == pytest.approx(want, rel=1e-6)
    assert m["rewards/chosen"] == pytest.approx(mean([beta * x for x in PC]), rel=1e-6)
    assert m["rewards/rejected"] == pytest.approx(mean([beta * x for x in PR]), rel=1e-6)


def test_dpo_metrics_by_hand():
    beta = 0.1
    _, m = ours(beta=beta)
    rc = [beta * (pc - rc) for pc, rc in zip(PC, RC)]
    rr = [beta * (pr - rr) for pr, rr in zip(PR, RR)]
    assert m["rewards/chosen"] == pytest.approx(mean(rc), rel=1e-6)
    assert m["rewards/rejected"] == pytest.approx(mean(rr), rel=1e-6)
    assert m["rewards/margins"] == pytest.approx(mean([a - b for a, b in zip(rc, rr)]), rel=1e-6)
    assert m["rewards/accuracies"] == pytest.approx(mean([float(a > b) for a, b in zip(rc, rr)]))
    assert m["logps/chosen"] == pytest.approx(mean(PC), rel=1e-6)
    assert m["logps/rejected"] == pytest.approx(mean(PR), rel=1e-6)
    assert m["weight"] == 3.0
    assert set(m) == {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                      "rewards/margins", "logps/chosen", "logps/rejected", "weight"}


@pytest.mark.parametrize("kw, match", [
    (dict(beta=0.1, loss_type="kto"), "loss_type='kto'"),
    (dict(beta=0.0), "beta=0.0"),
    (dict(beta=-1.0), "beta=-1.0"),
    (dict(beta=float("nan")), "beta=nan"),
    (dict(beta=0.1, label_smoothing=0.5), "label_smoothing=0.5"),
    (dict(beta=0.1, label_smoothing=-0.1), "label_smoothing=-0.1"),
    (dict(beta=0.1, loss_type="robust", label_smoothing=0.5), "label_smoothing=0.5"),
    (dict(beta=0.1, loss_type="ipo", label_smoothing=0.1), "no effect with loss_type='ipo'"),
])
def test_dpo_bad_arguments_are_named(kw, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        ours(**kw)


def test_dpo_loss_types_are_the_table_rows():
    """A loss type is a row of DPO_LOSSES; a name without one is refused by the loss and by the
    config, never trained as another type (the old if-chain's last branch meant robust)."""
    from jaxalign.config import ConfigError
    from jaxalign.losses.preference import DPO_LOSS_TYPES, DPO_LOSSES
    from jaxalign.train.dpo import DPOOptions
    assert DPO_LOSS_TYPES == tuple(DPO_LOSSES) == ("sigmoid", "ipo", "hinge", "robust")
    with pytest.raises(ValueError, match="loss_type='exo'"):
        ours(beta=0.1, loss_type="exo")
    with pytest.raises(ConfigError, match="dpo.loss_type 'exo'"):
        DPOOptions(loss_type="exo")
    assert DPOOptions(loss_type="ipo").average and not DPOOptions(loss_type="robust").average


def test_bradley_terry_plain_margin_and_centering():
    rc, rr, margin = [1.5, -0.25, 0.0, 3.0], [0.5, 0.75, 0.0, -1.0], [0.2, 0.0, 1.0, 0.5]
    args = jnp.asarray(rc, jnp.float32), jnp.asarray(rr, jnp.float32)

    plain = mean([-logsig(c - r) for c, r in zip(rc, rr)])
    loss, m = bradley_terry(*args)
    assert float(loss) == pytest.approx(plain, rel=1e-6)

    with_margin = mean([-logsig(c - r - d) for c, r, d in zip(rc, rr, margin)])
    loss, _ = bradley_terry(*args, margin_B=jnp.asarray(margin, jnp.float32))
    assert float(loss) == pytest.approx(with_margin, rel=1e-6)

    centred = with_margin + 0.01 * mean([(c + r) ** 2 for c, r in zip(rc, rr)])
    loss, _ = bradley_terry(*args, margin_B=jnp.asarray(margin, jnp.float32), center_coef=0.01)
    assert float(loss) == pytest.approx(centred, rel=1e-6)

    assert float(m["accuracy"]) == 0.5  # 1.5>0.5 and 3>-1 right; -0.25<0.75 wrong; the tie counts 0
    assert float(m["reward_chosen"]) == pytest.approx(mean(rc))
    assert float(m["reward_rejected"]) == pytest.approx(mean(rr))
    assert float(m["margin"]) == pytest.approx(mean([c - r for c, r in zip(rc, rr)]))
    assert float(m["weight"]) == 4.0


def test_bradley_terry_is_finite_for_huge_differences():
    loss, _ = bradley_terry(jnp.asarray([-200.0]), jnp.asarray([200.0]))
    assert float(loss) == pytest.approx(400.0, rel=1e-6)


def test_sequence_logps_sum_and_mean():
    tok = jnp.asarray([[-1.0, -2.0, -3.0], [-0.5, -9.0, -9.0], [-4.0, -4.0, -4.0]])
    mask = jnp.asarray([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    np.testing.assert_allclose(sequence_logps(tok, mask), [-6.0, -0.5, 0.0])
    np.testing.assert_allclose(sequence_logps(tok, mask, average=True), [-2.0, -0.5, 0.0])


# ---- against TRL's own DPOTrainer loss -------------------------------------------------------

def _trl_dpo(token_logps, completion_mask, ref_chosen, ref_rejected, *, beta, loss_type,
             label_smoothing):
    """Runs TRL 1.16 DPOTrainer._compute_loss with a stand-in model that returns given log-probs.

    In TRL 1.16 the loss is not a separate method: it lives in `_compute_loss(model, inputs)`,
    which calls the model with `fused_lm_head=True` and reads `outputs.log_probs` (plus a few
    logging-only fields). A fake model and accelerator are enough; precomputed reference
    log-probs avoid the reference model.
    """
    torch = pytest.importorskip("torch")
    dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
    from collections import defaultdict

    n2 = token_logps.shape[0]

    class FakeModel:
        training = True

        def __call__(self, **kw):
            shape = token_logps.shape
            # Only log_probs enters the loss; the other fields feed TRL's logging.
            return types.SimpleNamespace(log_probs=torch.tensor(token_logps),
                                         entropy=torch.zeros(shape), mean_logits=torch.zeros(shape),
                                         is_top1=torch.zeros(shape, dtype=torch.bool))

    trainer = object.__new__(dpo_trainer.DPOTrainer)
    fields = dict(model=FakeModel(), ld_alpha=None, precompute_ref_logps=True,
                  aux_loss_enabled=False, f_divergence_type="reverse_kl", loss_types=[loss_type],
                  loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing,
                  use_weighting=False, _total_train_tokens=0, _tp_size=1,
                  _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                  accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t,
                                                    gather_for_metrics=lambda t: t))
    for k, v in fields.items():
        object.__setattr__(trainer, k, v)
    inputs = {"input_ids": torch.ones(completion_mask.shape, dtype=torch.long),
              "attention_mask": torch.ones(completion_mask.shape, dtype=torch.long),
              "completion_mask": torch.tensor(completion_mask),
              "ref_chosen_logps": torch.tensor(ref_chosen),
              "ref_rejected_logps": torch.tensor(ref_rejected)}
    assert n2 == completion_mask.shape[0]
    loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()
               if k.startswith(("rewards/", "logps/"))}
    return float(loss), metrics


# TRL 1.16's "sigmoid" has no label smoothing (cDPO moved out of it), so it is compared at 0 only.
@pytest.mark.parametrize("loss_type, ls",
                         [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.15)])
def test_dpo_matches_trl(loss_type, ls):
    rng = np.random.default_rng(0)
    b, t = 4, 7
    # Completion mask over full sequences: a prompt (0s), the completion (1s), then padding (0s).
    completion_mask = np.zeros((2 * b, t + 1), np.int64)
    for i in range(2 * b):
        start, end = rng.integers(1, 3), rng.integers(4, t + 2)
        completion_mask[i, start:end] = 1
    shifted_mask = completion_mask[:, 1:]  # the positions whose log-probs are predicted
    # Small scale so beta*h straddles the hinge at 1 and the sigmoid is not saturated.
    policy_tok = (rng.normal(-0.3, 0.4, (2 * b, t)) * shifted_mask).astype(np.float32)
    ref_tok = (rng.normal(-0.3, 0.4, (2 * b, t)) * shifted_mask).astype(np.float32)
    beta = 0.5

    average = loss_type == "ipo"  # TRL's IPO works on per-token means
    mask = jnp.asarray(shifted_mask)
    pol = np.asarray(sequence_logps(jnp.asarray(policy_tok), mask, average=average))
    ref = np.asarray(sequence_logps(jnp.asarray(ref_tok), mask))  # TRL takes precomputed sums
    ref_avg = np.asarray(sequence_logps(jnp.asarray(ref_tok), mask, average=average))
    loss, m = dpo_loss(jnp.asarray(pol[:b]), jnp.asarray(pol[b:]), jnp.asarray(ref_avg[:b]),
                       jnp.asarray(ref_avg[b:]), beta=beta, loss_type=loss_type, label_smoothing=ls)

    want, trl_m = _trl_dpo(policy_tok, completion_mask, ref[:b], ref[b:], beta=beta,
                           loss_type=loss_type, label_smoothing=ls)
    assert float(loss) == pytest.approx(want, abs=1e-6, rel=1e-6)
    assert set(trl_m) == {"rewards/chosen", "rewards/rejected", "rewards/accuracies",
                          "rewards/margins", "logps/chosen", "logps/rejected"}
    if not average:  # TRL logs sum-based rewards even for IPO; ours follow the inputs
        for k, v in trl_m.items():
            assert float(m[k]) == pytest.approx(v, abs=1e-5, rel=1e-6), k


def test_pair_mask_excludes_fillers():
    """Filler pairs (pair_mask 0, as in a padded last eval batch) change no mean and no weight."""
    from jaxalign.losses.preference import bradley_terry, dpo_loss
    rng = np.random.default_rng(3)
    x = [jnp.asarray(rng.normal(size=6), jnp.float32) for _ in range(4)]
    mask = jnp.asarray([1, 1, 1, 1, 0, 0], jnp.float32)
    sub = [v[:4] for v in x]
    for fn, args, kw in ((bradley_terry, 2, dict(center_coef=0.1)),
                         (dpo_loss, 4, dict(beta=0.3, label_smoothing=0.1))):
        full_loss, full_m = fn(*x[:args], pair_mask_B=mask, **kw)
        sub_loss, sub_m = fn(*sub[:args], **kw)
        np.testing.assert_allclose(full_loss, sub_loss, rtol=1e-6)
        for k in sub_m:
            np.testing.assert_allclose(full_m[k], sub_m[k], rtol=1e-6, err_msg=k)


# ---- ORPO and SimPO: policy-only, on length-normalised log-probs --------------------------------

# Per-sequence log-prob SUMS and response token counts of (chosen, rejected).
SC, SR = [-6.0, -21.0, -1.5, -40.0], [-9.0, -12.0, -4.0, -39.0]
NC, NR = [4, 7, 5, 20], [6, 3, 8, 13]


def _orpo_by_hand(lam):
    """Hong et al. 2024 eq. 4-7 in plain floats (log(1 - p) through log1p)."""
    log_odds = lambda lp: lp - math.log1p(-math.exp(lp))
    ratio = [logsig(log_odds(c / a) - log_odds(r / b)) for c, r, a, b in zip(SC, SR, NC, NR)]
    nll = -sum(SC) / sum(NC)
    return nll - lam * mean(ratio), nll, mean(ratio)


def _ours_pol(fn, **kw):
    arrs = [jnp.asarray(x, jnp.float32) for x in (SC, SR, NC, NR)]
    loss, m = fn(*arrs, **kw)
    return float(loss), {k: float(v) for k, v in m.items()}


def test_orpo_is_the_paper_formula():
    from jaxalign.losses.preference import orpo_loss
    want, nll, ratio = _orpo_by_hand(0.25)
    got, m = _ours_pol(orpo_loss, lam=0.25)
    assert got == pytest.approx(want, rel=1e-6)
    assert m["nll_loss"] == pytest.approx(nll, rel=1e-6)
    assert m["log_odds_ratio"] == pytest.approx(ratio, rel=1e-6)
    assert m["rewards/chosen"] == pytest.approx(mean([0.25 * c / n for c, n in zip(SC, NC)]),
                                                rel=1e-6)
    assert m["weight"] == 4.0


def test_orpo_log_odds_stay_finite_near_certainty():
    """p -> 1 (mean log-prob -> 0): log(1 - p) must not cancel to -inf / NaN."""
    import jax
    from jaxalign.losses.preference import orpo_loss
    args = [jnp.asarray([x], jnp.float32) for x in (-1e-4, -3.0, 1.0, 1.0)]
    loss, m = orpo_loss(*args, lam=0.1)
    want = 1e-4 - 0.1 * logsig((-1e-4 - math.log(-math.expm1(-1e-4)))
                               - (-3.0 - math.log1p(-math.exp(-3.0))))
    assert float(loss) == pytest.approx(want, rel=1e-4)
    grads = jax.grad(lambda c: orpo_loss(c, *args[1:], lam=0.1)[0])(args[0])
    assert np.isfinite(np.asarray(grads)).all()


def test_orpo_matches_trl_odds_ratio_loss():
    """TRL 1.16 keeps ORPO in trl.experimental.orpo: its `odds_ratio_loss` on our mean log-probs,
    and its full loss `nll - losses.mean()` with the NLL taken over the same response tokens."""
    torch = pytest.importorskip("torch")
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    from jaxalign.losses.preference import orpo_loss
    trainer = object.__new__(orpo.ORPOTrainer)
    object.__setattr__(trainer, "beta", 0.25)
    object.__setattr__(trainer, "accelerator", types.SimpleNamespace(device=torch.device("cpu")))
    pc = torch.tensor([c / n for c, n in zip(SC, NC)], dtype=torch.float64)
    pr = torch.tensor([r / n for r, n in zip(SR, NR)], dtype=torch.float64)
    losses, chosen_r, rejected_r, ratio, log_odds = trainer.odds_ratio_loss(pc, pr)
    want = -sum(SC) / sum(NC) - float(losses.mean())
    got, m = _ours_pol(orpo_loss, lam=0.25)
    assert got == pytest.approx(want, abs=1e-6, rel=1e-6)
    assert m["log_odds_ratio"] == pytest.approx(float(ratio), abs=1e-6)
    assert m["log_odds_chosen"] == pytest.approx(float(log_odds), abs=1e-6)
    assert m["rewards/chosen"] == pytest.approx(float(chosen_r.mean()), abs=1e-6)
    assert m["rewards/rejected"] == pytest.approx(float(rejected_r.mean()), abs=1e-6)


def test_simpo_is_the_paper_formula():
    from jaxalign.losses.preference import simpo_loss
    beta, gamma = 2.0, 0.5
    want = mean([-logsig(beta * c / a - beta * r / b - gamma)
                 for c, r, a, b in zip(SC, SR, NC, NR)])
    got, m = _ours_pol(simpo_loss, beta=beta, gamma=gamma)
    assert got == pytest.approx(want, rel=1e-6)
    assert m["rewards/margins"] == pytest.approx(
        mean([beta * (c / a - r / b) for c, r, a, b in zip(SC, SR, NC, NR)]), rel=1e-6)


def test_simpo_matches_trl_cpo_simpo():
    """TRL 1.16 runs SimPO as CPOTrainer(loss_type='simpo'); cpo_alpha=0 drops its NLL term."""
    torch = pytest.importorskip("torch")
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    from jaxalign.losses.preference import simpo_loss
    beta, gamma = 2.0, 0.5
    trainer = object.__new__(cpo.CPOTrainer)
    for k, v in dict(beta=beta, simpo_gamma=gamma, loss_type="simpo", alpha=0.0,
                     label_smoothing=0.0,
                     accelerator=types.SimpleNamespace(device=torch.device("cpu"))).items():
        object.__setattr__(trainer, k, v)
    # CPO's get_batch_logps(average_log_prob=True) for simpo: the per-token means.
    pc = torch.tensor([c / n for c, n in zip(SC, NC)], dtype=torch.float64)
    pr = torch.tensor([r / n for r, n in zip(SR, NR)], dtype=torch.float64)
    losses, chosen_r, rejected_r = trainer.cpo_loss(pc, pr)
    got, m = _ours_pol(simpo_loss, beta=beta, gamma=gamma)
    assert got == pytest.approx(float(losses.mean()), abs=1e-6, rel=1e-6)
    assert m["rewards/chosen"] == pytest.approx(float(chosen_r.mean()), abs=1e-5)
    assert m["rewards/rejected"] == pytest.approx(float(rejected_r.mean()), abs=1e-5)


def test_policy_only_losses_ignore_fillers():
    """An empty filler pair (count 0, pair_mask 0) changes neither loss, metrics nor gradient."""
    import jax
    from jaxalign.losses.preference import orpo_loss, simpo_loss
    full = [jnp.asarray(x + [0.0], jnp.float32) for x in (SC, SR, NC, NR)]
    sub = [jnp.asarray(x, jnp.float32) for x in (SC, SR, NC, NR)]
    mask = jnp.asarray([1, 1, 1, 1, 0], jnp.float32)
    for fn, kw in ((orpo_loss, dict(lam=0.3)), (simpo_loss, dict(beta=2.0, gamma=0.4))):
        a, am = fn(*full, pair_mask_B=mask, **kw)
        b, bm = fn(*sub, **kw)
        np.testing.assert_allclose(a, b, rtol=1e-6)
        for k in bm:
            np.testing.assert_allclose(am[k], bm[k], rtol=1e-6, err_msg=k)
        g = jax.grad(lambda c: fn(c, *full[1:], pair_mask_B=mask, **kw)[0])(full[0])
        assert np.isfinite(np.asarray(g)).all() and float(g[-1]) == 0.0
