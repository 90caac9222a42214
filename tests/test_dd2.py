"""DD2: the AR teacher as a closed-form conditional denoiser, and the two training stages, checked against
oracles that fail when the maths or the plumbing is wrong.

1. the analytic score equals autograd of the mixture's log-density (float64), with its limits;
3. the AR-diffusion backbone sees exactly the prefix the teacher's teacher-forcing logits see (teacher forcing vs
   KV-cache decoding itself is tests/test_teachers_ar.py::test_teacher_forcing_equals_kv_cache_decoding);
5. CSD recovers a two-token correlation that an independent-token generator cannot: P(q2 == q1) >= 0.9 vs 0.5;
6. gradient plumbing: position i's loss reaches q_i only (stop-gradient prefix); teacher and guidance get none;
7. chain rule: the per-position conditional KLs add up to the joint KL.
"""
import math

import pytest
import torch

from onestep.ar_diffusion import (ar_diffusion_from_teacher, nearest_codes, posterior_logits, teacher_denoiser,
                                  teacher_score)
from onestep.methods.base import Batch, frozen
from onestep.methods.dd2 import DD2, DD2Config, DD2GroundTruthScore, DD2GroundTruthScoreConfig, chain_rule_kl
from onestep.teachers import AutoregressiveSource
from onestep.teachers_ar import AutoregressiveTeacher


# --- the closed-form denoiser ------------------------------------------------------------------------------
def _mixture(seed=0, k=7, d=3):
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(k, d, generator=g, dtype=torch.float64)
    log_p = torch.randn(k, generator=g, dtype=torch.float64).log_softmax(-1)
    log_p[[1, 4]] = -math.inf  # top-k-masked codes
    return codebook, log_p - log_p.logsumexp(-1)


@pytest.mark.parametrize("t", [0.05, 0.3, 0.9])
def test_analytic_score_equals_autograd_of_the_mixture_density(t):
    codebook, log_p = _mixture()
    x = torch.randn(50, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 1.5
    x.requires_grad_(True)
    # log p_t(x) = logsumexp_j [log p_j + log N(x; (1 - t) c_j, t^2 I)]
    log_density = (log_p - ((x[:, None] - (1 - t) * codebook) ** 2).sum(-1) / (2 * t**2)).logsumexp(-1)
    (autograd,) = torch.autograd.grad(log_density.sum(), x)
    score = teacher_score(x.detach(), t, log_p.expand(50, -1), codebook)
    torch.testing.assert_close(score, autograd, rtol=0, atol=1e-9)
    w = posterior_logits(x.detach(), t, log_p.expand(50, -1), codebook).softmax(-1)
    assert (w[:, [1, 4]] == 0).all() and torch.allclose(w.sum(-1), torch.ones(50, dtype=torch.float64))


def test_denoiser_limits_and_float32_batches_are_stable():
    codebook, log_p = _mixture()
    x = torch.randn(200, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    near_one = teacher_denoiser(x, 0.9999, log_p.expand(200, -1), codebook)
    assert (near_one - log_p.exp() @ codebook).norm(dim=-1).max() < 1e-3      # t -> 1: the mean code (error ~ (1-t)|x||c|)
    near_zero = teacher_denoiser(x, 1e-3, log_p.expand(200, -1), codebook)
    to_code = (near_zero[:, None] - codebook[log_p.isfinite()]).norm(dim=-1).min(-1).values
    assert to_code.max() < 1e-6                                                 # t -> 0: a code vector (of p > 0)
    # float32, large batches and far-out inputs: no overflow, agrees with float64
    big = torch.randn(4096, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 30
    t = torch.rand(4096, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 0.999
    ref = teacher_denoiser(big, t, log_p.expand(4096, -1), codebook)
    f32 = teacher_denoiser(big.float(), t.float(), log_p.float().expand(4096, -1), codebook.float())
    assert torch.isfinite(f32).all() and (f32.double() - ref).abs().max() < 1e-3


# --- tiny teachers -----------------------------------------------------------------------------------------------------
def _vq(codes: int, dim: int, codebook=None):
    from diffusers import VQModel

    torch.manual_seed(0)
    vq = VQModel(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                 latent_channels=dim, num_vq_embeddings=codes, norm_num_groups=4, sample_size=8)
    if codebook is not None:
        with torch.no_grad():
            vq.quantize.embedding.weight.copy_(codebook)
    return vq


def _gpt2(vocab: int, positions: int, width: int = 32, layers: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=width, n_layer=layers,
                                      n_head=4, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
                                      bos_token_id=vocab - 1, eos_token_id=vocab - 1))


def test_backbone_states_are_the_teachers_teacher_forcing_states():
    """z_i of the AR-diffusion model under the teacher's LM head gives the teacher's logits of token i."""
    teacher = AutoregressiveTeacher(_gpt2(16 + 3 + 1, 17), _vq(16, 4), 3, [4, 4]).eval()
    model = ar_diffusion_from_teacher(teacher)
    tokens = teacher.sample(torch.tensor([0, 1, 2]), torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = model.hidden(torch.tensor([0, 1, 2]), tokens=tokens)
        torch.testing.assert_close(teacher.lm.lm_head(z)[..., :16], teacher.logits(tokens, torch.tensor([0, 1, 2])),
                                   rtol=0, atol=1e-5)


class _Ctx:
    """What the trainer lends a step, for loops without the trainer: plain Adam updates."""

    def __init__(self, modules: dict, lr, seed: int = 0):
        self.modules, self.rng, self.step = modules, torch.Generator().manual_seed(seed), 0
        lrs = lr if isinstance(lr, dict) else {k: lr for k in modules}
        self.opts = {k: torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=lrs[k], betas=(0.0, 0.999))
                     for k, m in modules.items()}

    def net(self, name):
        return self.modules[name]

    def update(self, name, loss_fn, batch):
        loss, logs = loss_fn(batch)
        self.opts[name].zero_grad(set_to_none=True)
        loss.backward()
        self.opts[name].step()
        return logs


def _copy_teacher(n_steps: int = 300):
    """An unconditional 2-token teacher over codes c0 = (-1, 0), c1 = (1, 0): q1 ~ (1/2, 1/2), q2 = q1 (the
    paper's motivating example), a GPT-2 trained to it by cross-entropy."""
    lm = _gpt2(2 + 1, 3, width=32, layers=1)
    opt = torch.optim.Adam(lm.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(n_steps):
        q1 = torch.randint(2, (64,), generator=g)
        ids = torch.stack([torch.full_like(q1, 2), q1], 1)
        logits = lm(input_ids=ids).logits[..., :2]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 2), torch.stack([q1, q1], 1).reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher = AutoregressiveTeacher(lm, _vq(2, 2, torch.tensor([[-1.0, 0.0], [1.0, 0.0]])), None, [1, 2])
    teacher.requires_grad_(False).eval()
    with torch.no_grad():
        p = teacher.probs(teacher.logits(torch.tensor([[0, 0], [1, 1]]), None))
    assert p[:, 0].sub(0.5).abs().max() < 0.05 and p[0, 1, 0] > 0.99 and p[1, 1, 1] > 0.99
    return AutoregressiveSource(path="copy-teacher", model=teacher)


def _joint(ids: torch.Tensor) -> torch.Tensor:
    table = torch.zeros(2, 2, dtype=torch.float64)
    table.index_put_((ids[:, 0], ids[:, 1]), torch.ones(len(ids), dtype=torch.float64), accumulate=True)
    return table / len(ids)


# --- CSD recovers the correlation ---------------------------------------------------------------------------
@pytest.mark.slow
def test_csd_recovers_the_two_token_correlation(one_thread):
    source = _copy_teacher()
    head = {"head_width": 64, "res_blocks": 2}
    batch = Batch(x=None, cond={}, size=128)
    gts = DD2GroundTruthScore(DD2GroundTruthScoreConfig(head=head, optimizer={"lr": 1e-3}), source, None)
    ctx = _Ctx({"model": gts.model}, 1e-3)
    for ctx.step in range(300):
        gts.step(batch, ctx)
    csd = DD2(DD2Config(head=head), source, None)
    csd.gen.load_state_dict(gts.model.state_dict())
    csd.guidance.load_state_dict(gts.model.state_dict())
    # the recipe's learning rates: the guidance network 10x the generator (equal rates oscillate between modes)
    ctx = _Ctx({"generator": csd.gen, "guidance": csd.guidance}, {"generator": 1e-4, "guidance": 1e-3}, seed=1)
    for ctx.step in range(400):
        csd.step(batch, ctx)
    with torch.no_grad():
        q = csd.gen.generate(torch.randn(4000, 2, 2, generator=torch.Generator().manual_seed(9)))
        q0 = gts.model.generate(torch.randn(4000, 2, 2, generator=torch.Generator().manual_seed(9)))
    ids, ids0 = nearest_codes(q, source.model.codebook), nearest_codes(q0, source.model.codebook)
    assert (ids0[:, 0] == ids0[:, 1]).double().mean() < 0.75  # the stage-1 start does not have the correlation
    same, first = (ids[:, 0] == ids[:, 1]).double().mean().item(), (ids[:, 0] == 0).double().mean().item()
    distance = (q - source.model.codebook[ids]).norm(dim=-1).mean().item()
    teacher_joint = torch.tensor([[0.5, 0.0], [0.0, 0.5]], dtype=torch.float64)
    independent = teacher_joint.sum(1, keepdim=True) * teacher_joint.sum(0, keepdim=True)  # the baseline's law
    assert (independent.diagonal().sum() - 0.5).abs() < 1e-12
    assert same >= 0.9, (same, first, distance)
    assert 0.35 <= first <= 0.65, (same, first, distance)
    assert distance < 0.25, (same, first, distance)
    kl, _ = chain_rule_kl(teacher_joint, _joint(ids).clamp_min(1e-12))   # KL(T || G): the mass G puts on q2 == q1
    assert kl < 0.2


# --- gradient plumbing ---------------------------------------------------------------------------------------
def test_position_i_loss_reaches_q_i_only_and_no_frozen_network_gets_a_gradient(tiny_ar_teacher_dir):
    teacher = AutoregressiveTeacher.from_pretrained(tiny_ar_teacher_dir)
    source = AutoregressiveSource(path=tiny_ar_teacher_dir, model=teacher)
    method = DD2(DD2Config(head={"head_width": 16, "res_blocks": 1}), source, None)
    with torch.no_grad():  # a guidance network that is not the identity at init
        for p in method.guidance.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ctx = _Ctx({"generator": method.gen, "guidance": method.guidance}, 1e-3)
    labels = torch.tensor([0, 3, 7])
    q = method.gen.generate(torch.randn(3, 16, 4, generator=torch.Generator().manual_seed(0)), labels)
    q_leaf = q.detach().requires_grad_(True)
    with frozen(method.guidance):
        per, _ = method.csd_loss(q_leaf, labels, ctx, per_position=True)
        for i in range(16):
            (grad,) = torch.autograd.grad(per[:, i].sum(), q_leaf, retain_graph=True)
            others = torch.cat([grad[:, :i], grad[:, i + 1:]], dim=1)
            assert grad[:, i].abs().sum() > 0 and others.abs().max() == 0, i
        per.mean().backward()
    assert all(p.grad is None for p in method.guidance.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    # and through the generator: its parameters do get the gradient
    with frozen(method.guidance):
        loss, _ = method.generator_loss(Batch(x=None, cond={"class_labels": labels}, size=3), ctx)
        loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.gen.parameters())
    assert all(p.grad is None for p in method.guidance.parameters())


# --- chain-rule bookkeeping ------------------------------------------------------------------------------------
def test_per_position_conditional_kls_add_up_to_the_joint_kl():
    g = torch.Generator().manual_seed(0)
    for shape in [(3, 3, 3), (2, 4), (4, 2, 3, 2)]:
        p_gen = torch.rand(shape, generator=g, dtype=torch.float64).add(0.01)
        p_teacher = torch.rand(shape, generator=g, dtype=torch.float64).add(0.01)
        joint, by_position = chain_rule_kl(p_gen / p_gen.sum(), p_teacher / p_teacher.sum())
        assert joint > 0.01 and abs(joint - by_position) < 1e-10
    # a generator right at every position except one: the sum picks that position's KL, weighted by its prefix law
    teacher = torch.tensor([[0.5, 0.0], [0.0, 0.5]], dtype=torch.float64) + 1e-12
    independent = torch.full((2, 2), 0.25, dtype=torch.float64)
    joint, by_position = chain_rule_kl(independent, teacher / teacher.sum())
    assert abs(joint - by_position) < 1e-9 and joint > 10  # independent tokens put half the mass where T has none


def test_gts_regression_target_is_the_analytic_denoiser(tiny_ar_teacher_dir):
    """A stage-1 loss of exactly zero for a model that is the analytic denoiser, positive for the model itself."""
    teacher = AutoregressiveTeacher.from_pretrained(tiny_ar_teacher_dir)
    source = AutoregressiveSource(path=tiny_ar_teacher_dir, model=teacher)
    method = DD2GroundTruthScore(DD2GroundTruthScoreConfig(head={"head_width": 16, "res_blocks": 1}), source, None)
    batch = Batch(x=None, cond={"class_labels": torch.tensor([1, 2])}, size=2)

    class Oracle(torch.nn.Module):
        def forward(self, x_t, t, tokens, class_labels=None):
            log_p = method.teacher_log_probs(tokens, class_labels)
            return teacher_denoiser(x_t, t, log_p, method.codebook)

    loss, _ = method.loss(batch, _OracleCtx(Oracle()))
    assert loss.item() < 1e-10
    loss, _ = method.loss(batch, _OracleCtx(method.model))
    assert loss.item() > 1e-4


class _OracleCtx:
    def __init__(self, model):
        self.model, self.rng, self.step = model, torch.Generator().manual_seed(0), 0

    def net(self, name):
        return self.model
