"""SlimFlow (onestep/methods/slimflow.py): the time convention against diffusers' flow matching, the beta schedule,
the flip pairing, both losses at the optimum of a straight (linear) flow, and the two stages chained through folders.
(Pairs: tests/test_pairs.py; train / resume / export / load for each stage: tests/test_method_contract.py.)"""
import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from onestep.data.datasets import TensorData
from onestep.denoisers import denoiser_from_pretrained
from onestep.methods.base import Batch
from onestep.methods.slimflow import (Distance, SlimFlowDistill, SlimFlowDistillConfig, SlimFlowReflow,
                                      SlimFlowReflowConfig, beta_schedule, blend_noise, flip_pairs, from_slimflow,
                                      sigma_of_tau, to_slimflow)
from onestep.sampling.samplers import sample_euler
from onestep.teachers import DiffusionTeacher

A = torch.tensor([[1.5, 0.4], [0.4, 0.7]], dtype=torch.float64)   # symmetric positive definite: x = A z is straight
I2 = torch.eye(2, dtype=torch.float64)


class LinearFlow(ModelMixin, ConfigMixin):
    """A diffusers-style flow network v(y, tau) = M(tau) y for 2-D points, tau = timestep / 1000.

    kind "oracle": the exact velocity of the coupling x = A z, v* = (I - A)((1 - tau) A + tau I)^-1 y (diffusers'
    convention v = z - x); kind "one_step": M = (tau0 I - A) / tau0^2, so that one VE step from sigma_init (flow time
    tau0) lands exactly on A z."""

    @register_to_config
    def __init__(self, dim: int = 2, kind: str = "oracle", tau0: float = 0.99, scale: float = 1.0):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # a parameter, so the network is trainable / countable

    def forward(self, sample, timestep, return_dict=True):
        tau = (timestep.double() / 1000).reshape(-1, 1, 1)
        if self.config.kind == "oracle":
            a = self.config.scale * A
            m = (I2 - a) @ torch.linalg.inv((1 - tau) * a + tau * I2)
        else:
            t0 = self.config.tau0
            m = ((t0 * I2 - A) / t0**2).expand(len(sample), 2, 2)
        out = (m @ sample.double().unsqueeze(-1)).squeeze(-1).to(sample.dtype) + 0 * self.dummy
        return (out,)


def flow_denoiser(model):
    return denoiser_from_pretrained(model.double(), FlowMatchEulerDiscreteScheduler(shift=1.0))


class Ctx:
    """The slice of the trainer's StepContext the losses use."""

    def __init__(self, nets, step=0, seed=0):
        self.nets, self.step, self.rng = nets, step, torch.Generator().manual_seed(seed)

    def net(self, name):
        return self.nets[name]


def linear_pairs(n=256, seed=0):
    z = torch.randn((n, 2), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return z, z @ A.T


def methods(beta_value=0.0, guidance_first_step="student"):
    z, x = linear_pairs()
    data = TensorData(x=x, labels=None, num_classes=None, kind="points", name="linear pairs", extras={"noise": z},
                      cond={})
    teacher = DiffusionTeacher(path="oracle", denoiser=flow_denoiser(LinearFlow()))
    reflow = SlimFlowReflow(SlimFlowReflowConfig(model_class="MLPModel", model={}, beta_schedule="constant",
                                                 beta_value=beta_value), teacher, data)
    distill = SlimFlowDistill(SlimFlowDistillConfig(guidance_first_step=guidance_first_step), teacher, data)
    batch = Batch(x=x, size=len(x), extras={"noise": z})
    return reflow, distill, batch


# --- conventions ---------------------------------------------------------------------------------------------------
def test_time_convention_round_trip_and_euler_against_diffusers():
    sigma = torch.tensor([1e-3, 0.25, 1.0, 4.0, 99.0], dtype=torch.float64)
    v = torch.randn(5, 3, dtype=torch.float64)
    t, u = to_slimflow(sigma, v)
    assert torch.allclose(t, 1 - sigma / (1 + sigma))                 # t = 1 - tau
    back_sigma, back_v = from_slimflow(t, u)
    assert torch.allclose(back_sigma, sigma, rtol=1e-12) and torch.equal(back_v, v) and torch.equal(u, -v)

    model = LinearFlow(scale=1.3)
    denoiser = flow_denoiser(model)
    taus = np.linspace(0.99, 0.05, 7)
    z = torch.randn((4, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    start = taus[0] * z                                       # x_tau0 of this noise with the data part left out
    # diffusers: FlowMatchEulerDiscreteScheduler.step on the same grid (v = z - x, timestep = 1000 tau)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.set_timesteps(sigmas=taus)
    x_d = start.clone()
    for timestep in scheduler.timesteps:
        x_d = scheduler.step(model(x_d, timestep.reshape(1))[0], timestep, x_d).prev_sample
    # SlimFlow: data-time t = 1 - tau increasing, u = x - z, x <- x + (t' - t) u(x, t) fed 999 t in its code; here the
    # same network through the adapter (u = -v at timestep 1000 (1 - t))
    x_s, ts = start.clone(), 1 - np.append(taus, 0.0)
    for t0, t1 in zip(ts[:-1], ts[1:]):
        _, u = to_slimflow(torch.tensor(0.0), model(x_s, torch.tensor([1000 * (1 - t0)]))[0])
        x_s = x_s + (t1 - t0) * u
    # onestep: Euler on the VE form over sigma = tau / (1 - tau); VE state x = x_tau / (1 - tau)
    sigmas = torch.cat([sigma_of_tau(torch.tensor(taus)), torch.zeros(1, dtype=torch.float64)])
    x_ve = sample_euler(denoiser, z, sigmas)
    assert torch.allclose(x_d.double(), x_s, atol=1e-6) and torch.allclose(x_ve, x_s, atol=1e-6)
    assert not torch.allclose(x_s, start, atol=1e-2)          # the trajectory went somewhere


# --- the annealing -------------------------------------------------------------------------------------------------
def test_beta_schedule_endpoints_and_monotone():
    K = 1000
    assert [beta_schedule(k, "linear", K) for k in (0, K // 2, K, 3 * K)] == [1.0, 0.5, 0.0, 0.0]
    assert beta_schedule(0, "cosine", K) == 1.0 and math.isclose(beta_schedule(K // 2, "cosine", K), 0.5)
    assert beta_schedule(K, "cosine", K) == 0.0 and beta_schedule(2 * K, "cosine", K) == 0.0
    assert beta_schedule(0, "exp", K) == 1.0 and math.isclose(beta_schedule(K, "exp", K), math.exp(-1))
    assert {beta_schedule(k, "constant", K, 0.3) for k in (0, K, 5 * K)} == {0.3}
    for kind in ("linear", "cosine", "exp"):
        values = [beta_schedule(k, kind, K) for k in range(0, 3 * K, 7)]
        assert all(a >= b for a, b in zip(values, values[1:])), kind
    with pytest.raises(ValueError, match="beta_schedule must be one of"):
        beta_schedule(0, "warmup", K)


def test_blended_noise_stays_standard_normal_with_the_right_correlation():
    g = torch.Generator().manual_seed(0)
    z, xi = torch.randn(100_000, generator=g), torch.randn(100_000, generator=g)
    assert torch.equal(blend_noise(z, xi, 0.0), z) and torch.equal(blend_noise(z, xi, 1.0), xi)
    for beta in (0.3, 0.6, 0.9):
        zb = blend_noise(z, xi, beta)
        corr = torch.corrcoef(torch.stack([zb, z]))[0, 1]
        assert abs(zb.mean()) < 0.01 and abs(zb.var() - 1) < 0.02 and abs(corr - math.sqrt(1 - beta**2)) < 0.01


def test_flip_pairing_flips_both_ends_together():
    x, z = torch.randn(6, 1, 4, 4), torch.randn(6, 1, 4, 4)
    coin = torch.tensor([True, False, True, False, False, True])
    fx, fz = flip_pairs(x, z, coin)
    for i, c in enumerate(coin):
        assert torch.equal(fx[i], x[i].flip(-1) if c else x[i]) and torch.equal(fz[i], z[i].flip(-1) if c else z[i])


# --- both losses at the optimum of a straight flow -----------------------------------------------------------------
def test_reflow_loss_is_zero_for_the_exact_velocity_of_a_straight_coupling():
    reflow, _, batch = methods(beta_value=0.0)
    oracle = flow_denoiser(LinearFlow())
    loss, logs = reflow.loss(batch, Ctx({"model": oracle}))
    assert loss.item() < 1e-10 and logs["beta"] == 0.0
    wrong, _ = reflow.loss(batch, Ctx({"model": flow_denoiser(LinearFlow(scale=1.1))}))
    assert wrong.item() > 1e-3                                 # a slightly different flow is not the optimum
    annealed, _, _ = methods(beta_value=0.5)                   # blended noise: v* of the pairs is no longer exact
    assert annealed.loss(batch, Ctx({"model": oracle}))[0].item() > 1e-2
    sigma0 = 99.0                                              # tau 0.99: start on the path, x + sigma0 z
    x_one_step = sample_euler(oracle, batch.extras["noise"] + batch.x / sigma0,
                              torch.tensor([sigma0, 0.0], dtype=torch.float64))
    assert torch.allclose(x_one_step.double(), batch.x, atol=1e-4)   # straight paths: one Euler step is exact


def test_distillation_losses_are_zero_when_the_student_is_exact_and_the_guide_straight():
    _, distill, batch = methods()
    tau0 = float(distill.gen.sigma_init / (1 + distill.gen.sigma_init))
    distill.gen.denoiser.model = LinearFlow(kind="one_step", tau0=tau0).double()
    assert torch.allclose(distill.gen(batch.extras["noise"]).double(), batch.x, atol=1e-5)   # G(z) = A z
    loss, logs = distill.loss(batch, Ctx({"generator": distill.gen}))
    assert logs["loss/pair"] < 1e-10 and logs["loss/guidance"] < 1e-10 and loss.item() < 1e-10
    distill.gen.denoiser.model = LinearFlow(kind="one_step", tau0=tau0 - 0.05).double()   # student off the optimum
    _, logs = distill.loss(batch, Ctx({"generator": distill.gen}))
    assert logs["loss/pair"] > 1e-3 and logs["loss/guidance"] > 1e-4


def test_guidance_gradient_flows_only_through_the_students_output():
    _, distill, batch = methods()
    distill.config = distill.config.model_copy(update={"pair_weight": 0.0})
    seen = []
    original = distill.denoiser.forward
    distill.denoiser.forward = lambda x, sigma, **c: (seen.append(x.requires_grad), original(x, sigma, **c))[1]
    loss, _ = distill.loss(batch, Ctx({"generator": distill.gen}))
    assert seen == [False]                                     # the guide sees a stopped-gradient first step
    assert loss.requires_grad


# --- distances -----------------------------------------------------------------------------------------------------
def test_distances():
    a, b = torch.zeros(3, 1, 16, 16), torch.full((3, 1, 16, 16), 0.5)
    assert torch.allclose(Distance("l2")(a, b), torch.full((3,), 0.25))
    c = 0.00054 * 16
    assert torch.allclose(Distance("pseudo_huber")(a, b), torch.full((3,), math.sqrt(64 + c * c) - c))
    features = Distance("digits_features")
    assert torch.allclose(features(b, b), torch.zeros(3)) and (features(a - 0.8, b) > 0).all()


def test_distill_refuses_data_without_pairs():
    teacher = DiffusionTeacher(path="oracle", denoiser=flow_denoiser(LinearFlow()))
    data = TensorData(x=torch.zeros(4, 2), labels=None, num_classes=None, kind="points", name="gaussian_grid")
    with pytest.raises(ValueError, match="needs \\(noise, sample\\) pairs.*pairs:DIR, or pair_weight: 0"):
        SlimFlowDistill(SlimFlowDistillConfig(), teacher, data)
    with pytest.raises(ValueError, match="trains on \\(noise, sample\\) pairs"):
        SlimFlowReflow(SlimFlowReflowConfig(model_class="MLPModel", model={}), teacher, data)


# --- the stages chained through folders ----------------------------------------------------------------------------
def test_stages_chain_through_folders(tiny_teacher_dir, tmp_path, one_thread, capsys):
    from onestep.denoisers import load_teacher
    from onestep.networks import count_parameters
    from onestep.pipelines import OneStepPipeline, TeacherPipeline, load_pipeline
    from onestep.schedules import FlowMatchSchedule
    from onestep.training.config import config_from_dict
    from onestep.training.trainer import Trainer

    def run(recipe, out):
        Trainer(config_from_dict({"seed": 0, "output_dir": str(out), **recipe, "eval": {"enabled": False},
                                  "train": {"steps": 2, "batch_size": 4, "checkpoint_every": 2, "sample_every": 100,
                                            "export_raw": True}})).train()

    stage1 = SlimFlowReflow.smoke_recipe(tiny_teacher_dir)
    run(stage1, tmp_path / "reflow")
    assert "slimflow_reflow: student UNet2DModel" in capsys.readouterr().out
    flow = load_teacher(str(tmp_path / "reflow" / "pipeline"))                # a diffusion teacher, flow-matching
    assert isinstance(flow.schedule, FlowMatchSchedule)
    assert isinstance(load_pipeline(tmp_path / "reflow" / "pipeline"), TeacherPipeline)
    small, big = count_parameters(flow), count_parameters(load_teacher(tiny_teacher_dir))
    assert small < big
    stage2 = {**SlimFlowDistill.smoke_recipe(str(tmp_path / "reflow" / "pipeline")),
              "init_from": {"generator": {"path": str(tmp_path / "reflow" / "pipeline_raw"), "weights": "raw"}}}
    run(stage2, tmp_path / "distill")
    pipe = load_pipeline(tmp_path / "distill" / "pipeline")
    assert isinstance(pipe, OneStepPipeline) and count_parameters(pipe.network) == small
    assert pipe.card["parameters"] == small and pipe.scheduler.config._class_name == "FlowMatchEulerDiscreteScheduler"


# --- the pair sampler ---------------------------------------------------------------------------------------------
def test_heun_pairs_are_closer_to_the_exact_ode_than_euler():
    """Gaussian data N(0, s^2): D(x, sigma) = x s^2 / (s^2 + sigma^2) and the exact PF-ODE end point from x at
    sigma_0 is x s / sqrt(s^2 + sigma_0^2)."""
    from onestep.sampling.samplers import sample_heun

    s2 = 0.25
    denoise = lambda x, sigma, **c: x * s2 / (s2 + sigma**2)  # noqa: E731
    noise = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = {}
    for n in (12, 24):
        sigmas = torch.cat([torch.logspace(math.log10(80), math.log10(0.01), n, dtype=torch.float64),
                            torch.zeros(1, dtype=torch.float64)])
        exact = noise * sigmas[0] * math.sqrt(s2) / torch.sqrt(s2 + sigmas[0] ** 2)
        errors[n] = [(sampler(denoise, noise, sigmas) - exact).abs().max().item() for sampler in (sample_euler,
                                                                                                  sample_heun)]
    assert errors[24][1] < errors[24][0] / 3                       # Heun beats Euler at the same steps
    assert errors[12][1] / errors[24][1] > 3.5 > 2.5 > errors[12][0] / errors[24][0]   # 2nd vs 1st order
