"""The objective interface (model/objectives): registry, config checks, the toy-objective contract, and the
exact hooks of the two founding objectives (mdm, ar) against independent computations."""
import itertools

import pytest
import torch

from model import ModelConfig, Transformer
from model.objectives import (OBJECTIVES, DiffusionConfig, Noised, Objective, StepNoise, build_objective,
                              draw_step_noise, register)
from model.objectives.mdm import mdm_loss
from model.objectives.schedules import get_schedule

V, MASK = 3, 3


def tiny(causal=False, seed=0, length=4):
    cfg = ModelConfig(dim=16, n_layers=1, n_heads=2, ffn_dim=32, vocab_size=V + 1, mask_id=MASK,
                      max_seq_len=8, causal=causal, init_std=0.6)
    m = Transformer(cfg)
    m.init_weights(seed=seed)
    return m.eval()


def test_registry_has_the_founding_objectives_and_suggests_close_names():
    assert {"mdm", "ar"} <= set(OBJECTIVES)
    with pytest.raises(ValueError, match="did you mean 'mdm'"):
        build_objective(DiffusionConfig(objective="mdn"), mask_id=MASK)


def test_objective_checks_the_model_it_needs():
    with pytest.raises(ValueError, match="model.causal=true"):
        build_objective(DiffusionConfig(objective="ar")).check_model(ModelConfig(causal=False))
    with pytest.raises(ValueError, match="model.causal=false"):
        build_objective(DiffusionConfig(objective="mdm")).check_model(ModelConfig(causal=True))


def test_draw_is_a_pure_function_of_seed_and_step_and_slices_by_rows():
    a = draw_step_noise(3, 7, 8, 16, stratified=True, random_length_prob=0.5)
    b = draw_step_noise(3, 7, 8, 16, stratified=True, random_length_prob=0.5)
    assert torch.equal(a.u, b.u) and torch.equal(a.mask_uniform, b.mask_uniform) and a.length == b.length
    c = draw_step_noise(3, 8, 8, 16, stratified=True, random_length_prob=0.5)
    assert not torch.equal(a.u, c.u)
    rows = a.rows([1, 5], 9)
    assert torch.equal(rows.u, a.u[[1, 5]]) and torch.equal(rows.mask_uniform, a.mask_uniform[[1, 5], :9])
    # Stratified over the global batch: one draw per stratum of (0, 1].
    assert sorted(int(u * 8 - 1e-9) for u in a.u.tolist()) == list(range(8))


def test_mdm_objective_equals_the_llada_loss_on_the_same_noise():
    model = tiny()
    x0 = torch.randint(0, V, (4, 6))
    noise = draw_step_noise(0, 1, 4, 6, stratified=True, random_length_prob=0)
    for schedule in ("linear", "cosine", "poly", "cos_alpha"):
        obj = build_objective(DiffusionConfig(schedule=schedule), mask_id=MASK)
        got, _ = obj.micro_loss(model, x0, noise)
        want, _ = mdm_loss(model, x0, noise.u, noise.mask_uniform, mask_id=MASK, schedule=get_schedule(schedule),
                           eps=1e-3)
        assert torch.equal(got, want), schedule
        # and by hand: sum over masked positions of CE * w(t) / (B * L)
        t = (1 - 1e-3) * noise.u + 1e-3
        sch = get_schedule(schedule)
        masked = noise.mask_uniform < sch.mask_prob(t)[:, None]
        xt = torch.where(masked, MASK, x0)
        ce = torch.nn.functional.cross_entropy(model(xt)[masked].float(), x0[masked], reduction="none")
        ref = (ce * sch.weight(t)[:, None].expand(4, 6)[masked]).sum() / 24
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_mdm_exact_nelbo_hook_matches_the_count_estimator_mean():
    from eval.elbo import sequence_samples
    model = tiny(seed=2)
    obj = build_objective(DiffusionConfig(), mask_id=MASK)
    x0 = torch.tensor([0, 2, 1, 1])

    def cond(xt):
        with torch.no_grad():
            return torch.log_softmax(model(xt[None])[0, :, :V].double(), -1)
    exact = obj.exact_nelbo(cond, x0)
    est = sequence_samples(model, x0[None], method="count", samples=400, seed=0, mask_id=MASK, objective=obj)
    se = float(est.std()) / 400 ** 0.5
    assert abs(float(est.mean()) - exact) < 4 * se + 1e-9


def test_mdm_reverse_step_is_bayes_rule_of_the_absorbing_process():
    obj = build_objective(DiffusionConfig(schedule="cosine"), mask_id=MASK)
    t, s = 0.7, 0.4
    p_x0 = torch.tensor([[0.2, 0.5, 0.3, 0.0]], dtype=torch.float64)
    post = obj.reverse_step(p_x0, torch.tensor([MASK]), t, s)
    a_t, a_s = (float(obj.schedule.alpha(torch.tensor(v, dtype=torch.float64))) for v in (t, s))
    # Bayes: p(z_s | z_t = m, x) = q(z_t = m | z_s) q(z_s | x) / q(z_t = m | x), averaged over p(x).
    want = torch.zeros(4, dtype=torch.float64)
    for x in range(V):
        q_zs = {x: a_s, MASK: 1 - a_s}
        q_t_given_s = {x: 1 - a_t / a_s, MASK: 1.0}  # clean at s is masked at t with prob 1 - a_t/a_s
        for zs, p in q_zs.items():
            want[zs] += p_x0[0, x] * q_t_given_s[zs] * p / (1 - a_t)
    torch.testing.assert_close(post[0], want)
    clean = obj.reverse_step(p_x0, torch.tensor([1]), t, s)
    assert torch.equal(clean[0], torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64))


def test_ar_exact_nelbo_hook_is_the_chain_rule():
    model = tiny(causal=True, seed=3)
    obj = build_objective(DiffusionConfig(objective="ar"), mask_id=MASK)
    x0 = torch.tensor([1, 0, 2, 2])

    def cond(x):
        with torch.no_grad():
            logits = model(x[None])[0].double()
        logits[:, MASK] = float("-inf")
        return torch.log_softmax(logits, -1)
    from eval.elbo import evaluate_blocks
    est = evaluate_blocks(model, x0[None], method="ar", mask_id=MASK, objective=obj)
    assert abs(est.total_nats - obj.exact_nelbo(cond, x0)) < 1e-5


def test_a_new_objective_is_one_class_and_one_registration():
    """The contract a new member of the family signs: a registered subclass is built from the config, checked
    against the model, and trains through the same calls the trainer makes (draw -> rows -> noise -> loss)."""
    name = "toy_identity"

    class Toy(Objective):  # predicts every token from itself: trivially learnable, but a real loss
        logits_at = "all"
        summary = "test only"
        title = "the toy objective"

        def noise(self, x0, noise: StepNoise, doc_ids=None) -> Noised:
            return Noised(x0=x0, xt=x0, at=torch.ones_like(x0, dtype=torch.bool), targets=x0.reshape(-1),
                          doc_ids=doc_ids)

        def loss(self, model, batch, *, ce_chunk=0):
            ce = model(batch.xt, logits_at=batch.at, targets=batch.targets, ce_chunk=ce_chunk)
            return ce.mean(), {}
    Toy.name = name
    register(Toy)
    try:
        obj = build_objective(DiffusionConfig(objective=name), mask_id=MASK)
        obj.check_model(ModelConfig())
        model = tiny()
        noise = obj.draw(0, 0, 4, 6).rows([0, 1], 6)
        loss, _ = obj.micro_loss(model, torch.randint(0, V, (2, 6)), noise)
        loss.backward()
        assert loss.item() > 0 and model.output.weight.grad is not None
        with pytest.raises(ValueError, match="registered twice"):
            register(Toy)
    finally:
        OBJECTIVES.pop(name)


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_every_objective_declares_what_it_needs(objective):
    cls = OBJECTIVES[objective]
    assert cls.logits_at in ("masked", "all", "next")
    assert cls.eval_methods, f"{objective} names no bound estimator"
    assert cls.summary and cls.title
    assert len(set(itertools.chain(cls.eval_methods))) == len(cls.eval_methods)
