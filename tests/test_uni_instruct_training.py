"""Uni-Instruct's training behaviour against the official SiD / DMD2 code (issue 10): noise-level window, GAN
term signs, divergence warm-up, frozen networks in eval mode."""
from types import SimpleNamespace

import pytest
import torch

from onestep.denoisers import DiffusersDenoiser, EDMDenoiser
from onestep.methods.uni_instruct import UniInstruct, UniInstructConfig
from onestep.schedules import DiscreteVPSchedule, EDMSchedule, karras_sigmas


def _sd_schedule():
    from diffusers import DDPMScheduler

    return DiscreteVPSchedule(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                            beta_end=0.012).alphas_cumprod)


def _draw(schedule, n=200_000, denoiser=DiffusersDenoiser, **cfg):
    method = SimpleNamespace(config=UniInstructConfig(**cfg), denoiser=denoiser(torch.nn.Identity(), schedule))
    ctx = SimpleNamespace(rng=torch.Generator().manual_seed(0))
    return UniInstruct.generator_sigmas(method, n, ctx, "cpu")


def test_generator_timesteps_on_a_discrete_teacher_are_truncated_to_the_window_not_clamped():
    schedule = _sd_schedule()
    t = schedule.timestep(_draw(schedule).double()).round()
    assert t.min() >= 20 and t.max() <= 979
    counts = torch.bincount(t.long(), minlength=1000).double() / len(t)
    # no pile-up on the ends: an end bin holds no more than its neighbours (clamping put 17.7 % on t = 0)
    assert counts[20] <= 1.5 * counts[21:26].mean() and counts[979] <= 1.5 * counts[974:979].mean()
    assert counts.max() < 0.01
    # inside the window the draw is the Karras one conditioned on the window (rejection sampling as reference)
    ref = schedule.timestep(karras_sigmas(400_000, torch.Generator().manual_seed(1), u_max=0.8)).round()
    ref = ref[(ref >= 20) & (ref <= 979)]
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert abs(t.quantile(q) - ref.quantile(q)) <= 3, q


def test_generator_timesteps_window_is_configurable_and_checked():
    schedule = _sd_schedule()
    t = schedule.timestep(_draw(schedule, 20_000, generator_timesteps=(100, 500)).double()).round()
    assert t.min() >= 100 and t.max() <= 500 and (t == 100).float().mean() < 0.01
    with pytest.raises(ValueError, match="generator_timesteps"):
        UniInstructConfig(generator_timesteps=(500, 100))


def test_generator_sigma_uniform_draws_the_native_timestep_uniformly_on_the_window():
    """DMD2's draw: every timestep of the window about equally often, none outside."""
    schedule = _sd_schedule()
    t = schedule.timestep(_draw(schedule, generator_sigma="uniform").double()).round()
    assert t.min() >= 20 and t.max() <= 979
    counts = torch.bincount(t.long(), minlength=1000)[21:979].double() / len(t)
    assert (counts - 1 / 959).abs().max() < 0.3 / 959
    for q in (0.1, 0.5, 0.9):
        assert abs(t.quantile(q) - (20 + q * 959)) <= 3, q


def test_continuous_teacher_draw_is_unchanged_by_the_window():
    """EDM: the default window is the schedule's range, which holds the whole Karras draw: same numbers as before."""
    sigma = _draw(EDMSchedule(), 10_000, denoiser=EDMDenoiser)
    expected = karras_sigmas(10_000, torch.Generator().manual_seed(0), u_max=0.8).float()
    torch.testing.assert_close(sigma, expected, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------------------------
# Method-level checks on the shipped 2-D grid teacher (an MLP under EDM: milliseconds per pass)
# --------------------------------------------------------------------------------------------------------------
def _grid_method(**cfg):
    from onestep.data import load_dataset
    from onestep.denoisers import load_teacher
    from onestep.resources import GRID_TEACHER

    torch.manual_seed(0)   # the logit head's initialisation
    data = load_dataset("gaussian_grid", num_samples=256, seed=0)
    data.cond = {}
    from onestep.teachers import DiffusionTeacher

    teacher = DiffusionTeacher(str(GRID_TEACHER), denoiser=load_teacher(str(GRID_TEACHER)))
    method = UniInstruct(UniInstructConfig(**cfg), teacher, data)
    # a fake score away from the teacher (as after some training), the same for every method built here: with the
    # fake equal to the teacher every generator loss and gradient is zero
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in method.fake.denoiser.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return method


class _Ctx:
    """The StepContext a trainer lends, for one process and no optimizer: `update` only back-propagates."""

    def __init__(self, method, step, seed=0):
        self.step, self.rng = step, torch.Generator().manual_seed(seed)
        self.nets = {name: module for name, (module, _) in method.trainable().items()}

    def net(self, name):
        return self.nets[name]

    def mean_across_processes(self, value):
        return value

    def update(self, name, loss_fn, batch):
        loss, logs = loss_fn(batch)
        loss.backward()
        return logs


def _batch(method, n=64):
    from onestep.methods.base import Batch

    return Batch(x=method.data.x[:n], cond={}, size=n)


def _generator_loss_and_grad(method, step, seed=0):
    method.gen.zero_grad(set_to_none=True)
    loss, _ = method.generator_loss(_batch(method), _Ctx(method, step, seed))
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in method.gen.parameters() if p.grad is not None])


@pytest.mark.parametrize("loss, divergence, reference", [("ui", "fkl", dict(loss="sid", alpha=1.0)),
                                                         ("ui", "js", dict(loss="sid", alpha=1.0)),
                                                         ("dmd", "js", dict(loss="dmd"))])
def test_divergence_warm_up_is_the_reverse_kl_loss(loss, divergence, reference):
    """Before divergence_start_step the loss is reverse KL's (SiD alpha = 1 / DMD), not r = 1 put into the chosen
    divergence (for forward KL that adds a 'di' term and doubles 'sim': a different direction)."""
    method = _grid_method(loss=loss, divergence=divergence, divergence_start_step=10)
    rkl = _grid_method(**reference)   # same initial networks (copies of the teacher), same random draws
    loss_warm, grad_warm = _generator_loss_and_grad(method, step=3)
    loss_rkl, grad_rkl = _generator_loss_and_grad(rkl, step=3)
    assert grad_rkl.norm() > 1e-3
    torch.testing.assert_close(loss_warm, loss_rkl, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_warm, grad_rkl, rtol=1e-4, atol=1e-6 * grad_rkl.abs().max().item())
    # from the start step on, the chosen divergence (with its density ratio) takes over
    _, grad_after = _generator_loss_and_grad(method, step=10)
    assert (grad_after - grad_rkl).norm() > 0.05 * grad_rkl.norm()


def test_fake_score_is_in_eval_mode_for_the_generator_pass():
    """A fake score with dropout: the generator's pass must see it in eval mode (a deterministic function), and the
    fake score is back in train mode for its own update."""
    method = _grid_method(loss="sid")
    model = method.fake.denoiser.model
    model.mid_block = torch.nn.Dropout(0.5)   # where a UNet would have dropout; the grid MLP has none
    seen = []
    model.mid_block.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    assert method.fake.training
    logs = method.generator_step(_batch(method), _Ctx(method, step=0))
    assert seen == [False] and method.fake.training and model.mid_block.training and logs["loss/generator"] != 0
    # frozen: the fake score is a deterministic function of its inputs; outside, dropout is on again
    from onestep.methods.base import frozen

    with torch.no_grad():
        with frozen(method.fake):
            x = torch.randn(8, 2)
            torch.testing.assert_close(method.fake(x, 1.0)[0], method.fake(x, 1.0)[0])
        assert not torch.equal(method.fake(x, 1.0)[0], method.fake(x, 1.0)[0])   # train mode: dropout is on


# --------------------------------------------------------------------------------------------------------------
# GAN term (SiDA / DMD2): the discriminator tells real from fake, the generator's term pushes fakes towards "real"
# --------------------------------------------------------------------------------------------------------------
class _AdamCtx(_Ctx):
    def __init__(self, method, step, seed=0, lr=3e-3):
        super().__init__(method, step, seed)
        self.opts = getattr(method, "_test_opts", None) or {
            name: torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=lr)
            for name, m in self.nets.items()}
        method._test_opts = self.opts

    def update(self, name, loss_fn, batch):
        self.opts[name].zero_grad(set_to_none=True)
        loss, logs = loss_fn(batch)
        loss.backward()
        self.opts[name].step()
        return logs


def _logits(method, x, sigma=0.3, seed=5):
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return method.fake(x + sigma * eps, torch.full((len(x),), sigma), with_logit=True)[1]


def _trained_discriminator(steps=60):
    method = _grid_method(loss="sid", gan_weight=1.0)
    for step in range(steps):
        rows = torch.randint(len(method.data.x), (128,), generator=torch.Generator().manual_seed(step))
        from onestep.methods.base import Batch

        method.fake_score_step(Batch(x=method.data.x[rows], cond={}, size=128), _AdamCtx(method, step, seed=step))
    return method


def test_discriminator_learns_real_as_real_and_generated_as_fake():
    """Fails if real and fake are swapped in the discriminator call: real rows must end with the higher logit."""
    method = _trained_discriminator()
    z = torch.randn(512, 2, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        fake = method.gen(z)
    real = method.data.x[:512]
    margin = _logits(method, real).mean() - _logits(method, fake).mean()
    assert margin > 0.5, f"real logits exceed fake ones by only {margin:.3f}"


def test_generator_gan_term_moves_samples_towards_what_the_discriminator_calls_real():
    """Fails if the generator's GAN sign is flipped: a step on the GAN term alone raises the fakes' logits."""
    method = _trained_discriminator()
    method.config.generator_loss_scale = 1e-9   # the GAN term alone moves the generator
    z = torch.randn(512, 2, generator=torch.Generator().manual_seed(8))

    def fake_logit():
        with torch.no_grad():
            return _logits(method, method.gen(z)).mean()

    before = fake_logit()
    opt = torch.optim.SGD(method.gen.parameters(), lr=0.05)
    for step in range(5):
        opt.zero_grad(set_to_none=True)
        loss, logs = method.generator_loss(_batch(method), _Ctx(method, step=step, seed=100 + step))
        loss.backward()
        opt.step()
    assert logs["loss/generator_gan"] > 0
    after = fake_logit()
    assert after > before + 0.2, f"fake logit {before:.3f} -> {after:.3f}"


# --------------------------------------------------------------------------------------------------------------
# fake_samples: generator_step (DMD2's order): the fake score trains on the generator update's own samples
# --------------------------------------------------------------------------------------------------------------
class _MicroBatchCtx(_Ctx):
    """Gradient accumulation as the trainer does it: `loss_fn` once per contiguous micro-batch."""

    def update(self, name, loss_fn, batch):
        for part in batch.split(2):
            loss, logs = loss_fn(part)
            loss.backward()
        return logs


@pytest.mark.parametrize("fake_samples, generator_forwards", [("fresh", 4), ("generator_step", 2)])
def test_fake_score_trains_on_the_generator_updates_samples_when_asked(fake_samples, generator_forwards):
    method = _grid_method(loss="dmd", fake_samples=fake_samples)
    outputs, seen = [], []
    method.gen.register_forward_hook(lambda module, args, out: outputs.append(out.detach().clone()))
    fake_score_loss = method.fake_score_loss

    def spy(batch, ctx):
        seen.append(batch.extras.get("generator_samples"))
        return fake_score_loss(batch, ctx)

    method.fake_score_loss = spy
    logs = method.step(_batch(method), _MicroBatchCtx(method, step=0))
    assert len(outputs) == generator_forwards and logs["loss/fake_dsm"] > 0   # 2 micro-batches per update
    if fake_samples == "fresh":
        assert seen == [None, None]
    else:  # exactly the generator update's x0, detached, each micro-batch its own rows
        assert torch.equal(torch.cat(seen), torch.cat(outputs)) and not any(s.requires_grad for s in seen)
