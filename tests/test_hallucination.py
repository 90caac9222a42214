"""Hallucination score, filters, x0 recorder and the 1-D acceptance run (Aithal et al., NeurIPS 2024).

Paper: Aithal et al., NeurIPS 2024 (arXiv 2406.09358). The 2-D grid acceptance numbers live in
`bench/hallucination_toy.py` (minutes of training, too slow for the suite).
"""
import inspect

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMPipeline, DDPMScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler, UNet2DModel)
from sklearn.metrics import roc_auc_score

from onestep.sampling.hallucination import (FALLBACK_PROBE_SIGMAS, HalFilter, HalMonitor, LastK, TimestepRange,
                                            X0Recorder, generate_filtered, hal_score, probe_levels, probe_scores,
                                            probe_sigmas, probe_trajectory, x0_from_output)
from onestep.sampling.toy import (Decoder, ToyDDPMPipeline, ToyDenoiser, gap_densities, gaussian_1d,
                                  hallucinated, segment_distance, grid_means, toy_scheduler, train_ddpm)



@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """The toy models are tiny: one thread is faster, and the setting does not leak into other test files."""


# ---------------------------------------------------------------------------------------------------------------
# 1. Metric arithmetic and filters
# ---------------------------------------------------------------------------------------------------------------


def test_constant_trajectory_scores_zero():
    traj = torch.randn(1, 7, 3).expand(12, 7, 3)
    assert torch.equal(hal_score(traj), torch.zeros(7, dtype=torch.float64))


def test_alternating_trajectory_scores_a_squared():
    a = torch.tensor([0.5, 2.0, 3.0])
    signs = torch.tensor([1.0, -1.0] * 5)
    traj = signs[:, None, None] * a[None, :, None].expand(10, 3, 4)
    torch.testing.assert_close(hal_score(traj), (a**2).double(), rtol=0, atol=1e-12)


def test_window_takes_the_last_k_steps_in_generation_order():
    window = torch.randn(10, 5, 2)
    early = 1e6 * torch.randn(30, 5, 2)
    traj = torch.cat([early, window])
    torch.testing.assert_close(hal_score(traj, LastK(10)), hal_score(window, LastK(10)), rtol=0, atol=0)
    assert hal_score(traj, LastK(11)).min() > 1e3


def test_two_d_score_matches_numpy():
    traj = torch.randn(25, 64, 2, dtype=torch.float64)
    expected = np.var(traj[-10:].numpy(), axis=0).mean(axis=1)
    np.testing.assert_allclose(hal_score(traj).numpy(), expected, rtol=0, atol=1e-12)


def test_image_shaped_trajectory_averages_over_all_coordinates():
    traj = torch.randn(10, 3, 2, 4, 4, dtype=torch.float64)
    expected = np.var(traj.numpy(), axis=0).reshape(3, -1).mean(axis=1)
    np.testing.assert_allclose(hal_score(traj).numpy(), expected, rtol=0, atol=1e-12)


def test_timestep_range_selects_by_timestep_value():
    traj = torch.randn(30, 4, 1, dtype=torch.float64)
    timesteps = torch.arange(29, -1, -1)  # generation order: 29 ... 0
    torch.testing.assert_close(hal_score(traj, TimestepRange(0, 9), timesteps), hal_score(traj, LastK(10)))
    torch.testing.assert_close(hal_score(traj, TimestepRange(20, 25), timesteps), hal_score(traj[4:10], LastK(6)))
    with pytest.raises(ValueError, match="timesteps"):
        hal_score(traj, TimestepRange(0, 9))


def test_window_with_one_step_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        hal_score(torch.randn(1, 3, 2))


def test_keep_n_returns_exactly_the_n_lowest_with_stable_ties():
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 2.0])
    kept, returned = HalFilter(keep_n=3)(scores)
    assert kept.tolist() == [0, 1, 4]  # both zeros, then the first of the tied ones
    assert torch.equal(returned, scores.double())
    scores = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    kept, _ = HalFilter(keep_n=100)(scores)
    assert set(kept.tolist()) == set(torch.argsort(scores)[:100].tolist())


def test_threshold_and_quantile_filters():
    scores = torch.arange(100, dtype=torch.float64)
    assert HalFilter(threshold=9.5).mask(scores).sum() == 10
    assert HalFilter(quantile=0.9).mask(scores).sum() == 90
    assert HalFilter(quantile=0.0).mask(scores).tolist() == [True] + [False] * 99
    for bad in ({}, {"threshold": 1.0, "keep_n": 2}, {"quantile": 1.5}, {"keep_n": -1}):
        with pytest.raises(ValueError):
            HalFilter(**bad)


# ---------------------------------------------------------------------------------------------------------------
# 2. Recorder equivalence and transparency
# ---------------------------------------------------------------------------------------------------------------


class _TinyEps(torch.nn.Module):
    """eps_hat = x + 0.1 MLP(x, t): an untrained net whose x0 stays finite under the toy schedule (ab_950 ~ 5e-43
    turns any eps error into x0 ~ 1e21), as a trained one's would."""

    def __init__(self, dim):
        super().__init__()
        torch.manual_seed(0)
        self.net = Decoder(dim=dim, width=16).eval()
        self.config = self.net.config

    def forward(self, x, t):
        return x + 0.1 * self.net(x, t)


def _tiny_eps_model(dim=2):
    return _TinyEps(dim)


@torch.no_grad()
def _loop(scheduler, model, steps=20, batch=8, seed=0, **step_kwargs):
    """A DDPMPipeline-style loop; returns final sample, per-step (x_t, t, model_output, step output)."""
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    x = torch.randn(batch, model.config.dim, generator=generator) * getattr(scheduler, "init_noise_sigma", 1.0)
    record = []
    for t in scheduler.timesteps:
        scaled = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x  # not FM
        out = model(scaled, t)
        step = scheduler.step(out, t, x, generator=generator, **step_kwargs)
        record.append((x, t, out, step))
        x = step.prev_sample
    return x, record


def test_recorder_matches_ddpm_step_and_closed_form():
    model = _tiny_eps_model()
    plain, steps = _loop(toy_scheduler(), model)
    recorder = X0Recorder(toy_scheduler())
    proxied, _ = _loop(recorder, model)
    assert torch.equal(plain, proxied)  # same noise draws, same samples
    (run,) = recorder.trajectories()
    ab = toy_scheduler().alphas_cumprod
    for k, (x_t, t, eps, out) in enumerate(steps):
        closed = (x_t.double() - (1 - ab[t]).sqrt() * eps.double()) / ab[t].sqrt()
        torch.testing.assert_close(run.x0[k], out.pred_original_sample, rtol=0, atol=1e-6)
        torch.testing.assert_close(run.x0[k].double(), closed, rtol=1e-5, atol=1e-6)  # float32 step
        assert run.timesteps[k] == float(t)


@pytest.mark.parametrize("make", [
    lambda: DDIMScheduler(beta_schedule="linear", clip_sample=False),
    lambda: DDIMScheduler(beta_schedule="linear", clip_sample=False, prediction_type="v_prediction"),
    lambda: EulerDiscreteScheduler(beta_schedule="linear"),
    lambda: EulerDiscreteScheduler(beta_schedule="linear", prediction_type="v_prediction"),
    lambda: FlowMatchEulerDiscreteScheduler(),
], ids=["ddim", "ddim-v", "euler", "euler-v", "flowmatch"])
def test_recorder_matches_other_schedulers(make):
    model = _tiny_eps_model()
    kwargs = {"eta": 1.0} if isinstance(make(), DDIMScheduler) else {}
    plain, steps = _loop(make(), model, **kwargs)
    recorder = X0Recorder(make())
    proxied, _ = _loop(recorder, model, **kwargs)
    assert torch.equal(plain, proxied)
    (run,) = recorder.trajectories()
    reference = make()
    reference.set_timesteps(20)
    for k, (x_t, t, out, step) in enumerate(steps):
        if isinstance(reference, FlowMatchEulerDiscreteScheduler):  # no x0 in the output: x0 = x_t - sigma v
            expected = x_t - reference.sigmas[k] * out
        else:
            expected = step.pred_original_sample
        torch.testing.assert_close(run.x0[k], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls, prediction", [
    (cls, prediction) for cls in (DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler)
    for prediction in ("epsilon", "v_prediction", "sample")
    if not (cls is EulerDiscreteScheduler and prediction == "sample")])  # Euler has no "sample" prediction
def test_x0_from_output_agrees_with_the_schedulers(cls, prediction):
    """The fallback formulas (used for schedulers whose output lacks x0, and for record="raw")."""
    model = _tiny_eps_model()
    scheduler = cls(beta_schedule="linear", prediction_type=prediction, **(
        {} if cls is EulerDiscreteScheduler else {"clip_sample": False}))
    _, steps = _loop(scheduler, model, steps=10)
    probe = cls.from_config(scheduler.config)
    probe.set_timesteps(10)
    for k, (x_t, t, out, step) in enumerate(steps):
        x0 = x0_from_output(probe, out, t, x_t, step_index=k)
        torch.testing.assert_close(x0, step.pred_original_sample, rtol=1e-4, atol=1e-4)


def test_record_raw_ignores_the_samplers_clipping():
    model = _tiny_eps_model()
    clipped = X0Recorder(DDPMScheduler(beta_schedule="linear", clip_sample=True))
    raw = X0Recorder(DDPMScheduler(beta_schedule="linear", clip_sample=True), record="raw")
    _loop(clipped, model)
    _loop(raw, model)
    (c,), (r,) = clipped.trajectories(), raw.trajectories()
    assert c.x0.abs().max() <= 1.0 < r.x0.abs().max()
    inside = r.x0.abs() < 1
    torch.testing.assert_close(c.x0[inside], r.x0[inside], rtol=1e-4, atol=1e-4)


def test_recorder_is_transparent():
    inner = toy_scheduler()
    recorder = X0Recorder(inner, keep=3)
    recorder.set_timesteps(50)
    assert torch.equal(recorder.timesteps, inner.timesteps) and len(recorder.timesteps) == 50
    assert recorder.init_noise_sigma == inner.init_noise_sigma and recorder.config is inner.config
    assert len(recorder) == len(inner) == 1000 and recorder.order == inner.order
    assert inspect.signature(recorder.step) == inspect.signature(inner.step)  # pipelines look for eta/generator
    assert "generator" in inspect.signature(recorder.step).parameters
    assert inspect.signature(recorder.set_timesteps) == inspect.signature(inner.set_timesteps)
    recorder.custom_attribute = 3  # writes go to the scheduler
    assert inner.custom_attribute == 3
    x = torch.randn(2, 1)
    assert torch.equal(recorder.scale_model_input(x, 10), x)
    output = recorder.step(torch.zeros(2, 1), recorder.timesteps[0], x, return_dict=False)
    assert isinstance(output, tuple) and len(output) == 2  # DDPM's own tuple: (prev_sample, pred_original_sample)


def test_recorder_keeps_only_the_window():
    model = _tiny_eps_model()
    full, last3, ranged = X0Recorder(toy_scheduler()), X0Recorder(toy_scheduler(), keep=3), X0Recorder(
        toy_scheduler(), keep=TimestepRange(100, 300))
    for scheduler in (full, last3, ranged):
        _loop(scheduler, model)
    (f,), (l3,), (r,) = full.trajectories(), last3.trajectories(), ranged.trajectories()
    assert f.x0.shape[0] == 20 and torch.equal(l3.x0, f.x0[-3:])
    assert r.timesteps.tolist() == [300.0, 250.0, 200.0, 150.0, 100.0] and torch.equal(r.x0, f.x0[13:18])
    torch.testing.assert_close(ranged.scores(), hal_score(f.x0, TimestepRange(100, 300), f.timesteps))


def _tiny_ddpm_pipeline():
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100, clip_sample=False))


def test_monitor_is_transparent_inside_a_diffusers_pipeline():
    pipe = _tiny_ddpm_pipeline()
    original = pipe.scheduler
    kwargs = dict(num_inference_steps=12, output_type="np")
    plain = pipe(batch_size=3, generator=torch.Generator().manual_seed(1), **kwargs).images
    with HalMonitor(pipe, window=LastK(5)) as monitor:
        assert isinstance(pipe.scheduler, X0Recorder)
        monitored = pipe(batch_size=3, generator=torch.Generator().manual_seed(1), **kwargs).images
        pipe(batch_size=2, generator=torch.Generator().manual_seed(2), **kwargs)  # second call: new run
    assert pipe.scheduler is original and pipe.config["scheduler"] == ("diffusers", "DDPMScheduler")
    np.testing.assert_array_equal(plain, monitored)
    runs = monitor.recorder.trajectories()
    assert [tuple(r.x0.shape) for r in runs] == [(5, 3, 1, 8, 8), (5, 2, 1, 8, 8)]
    scores = monitor.scores()
    assert scores.shape == (5,) and (scores > 0).all()
    torch.testing.assert_close(scores[:3], hal_score(runs[0].x0))
    assert monitor.mask(keep_n=2).sum() == 2


def test_monitor_restores_the_scheduler_on_error():
    pipe = _tiny_ddpm_pipeline()
    original = pipe.scheduler
    with pytest.raises(RuntimeError, match="boom"):
        with HalMonitor(pipe):
            raise RuntimeError("boom")
    assert pipe.scheduler is original


def test_generate_filtered_keeps_the_n_lowest():
    pipe = _tiny_ddpm_pipeline()
    result = generate_filtered(pipe, 3, oversample=2.0, num_inference_steps=12, output_type="np",
                               generator=torch.Generator().manual_seed(0))
    assert result.samples.shape == (3, 8, 8, 1) and result.all_scores.shape == (6,)
    assert set(result.indices.tolist()) == set(torch.argsort(result.all_scores)[:3].tolist())
    torch.testing.assert_close(result.scores, result.all_scores[result.indices])
    pil = generate_filtered(pipe, 2, oversample=1.5, num_inference_steps=12, output_type="pil")
    assert isinstance(pil.samples, list) and len(pil.samples) == 2


# ---------------------------------------------------------------------------------------------------------------
# One-step probe and the toy denoiser adapter
# ---------------------------------------------------------------------------------------------------------------


def test_probe_arithmetic():
    x0 = torch.randn(6, 2, dtype=torch.float64)
    sigmas = [0.3, 0.2, 0.1, 0.05]
    constant = probe_scores(x0, lambda x, s: torch.ones_like(x), sigmas)
    assert torch.equal(constant, torch.zeros(6, dtype=torch.float64))
    gen = torch.Generator().manual_seed(0)
    traj = probe_trajectory(x0, lambda x, s: x, sigmas, torch.Generator().manual_seed(0), noise="shared")
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(traj, x0 + torch.tensor(sigmas, dtype=torch.float64)[:, None, None] * eps)
    expected = (eps**2).mean(1) * np.var(sigmas)  # identity denoiser, shared noise: Var_k(sigma_k) eps^2
    torch.testing.assert_close(probe_scores(x0, lambda x, s: x, sigmas, torch.Generator().manual_seed(0),
                                            noise="shared"), expected)
    chain = probe_trajectory(x0, lambda x, s: x, sigmas, torch.Generator().manual_seed(0), noise="shared",
                             mode="chain")
    torch.testing.assert_close(chain, x0 + torch.tensor(sigmas).cumsum(0).double()[:, None, None] * eps)
    seen = []
    probe_scores(x0, lambda x, s: seen.append(s) or x, sigmas)
    assert all(s.shape == (6,) for s in seen) and [float(s[0]) for s in seen] == pytest.approx(sigmas)


def test_toy_denoiser_matches_the_scheduler_x0():
    model = _tiny_eps_model(dim=1)
    scheduler = toy_scheduler()
    denoise = ToyDenoiser(model, scheduler.alphas_cumprod)
    ab = scheduler.alphas_cumprod
    for t in (0, 7, 150):
        sigma = ((1 - ab[t]) / ab[t]).sqrt()
        x_sigma = torch.randn(5, 1)
        x_t = (x_sigma / (1 + sigma**2).sqrt()).float()
        with torch.no_grad():
            eps = model(x_t, torch.tensor(t))
        expected = (x_t.double() - (1 - ab[t]).sqrt() * eps.double()) / ab[t].sqrt()
        torch.testing.assert_close(denoise(x_sigma, sigma.float()).double(), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(denoise.timestep(sigma[None].float()), torch.tensor([float(t)]), atol=1e-3,
                                   rtol=0)


def test_segment_distance_on_the_grid():
    means = grid_means()
    spacing = float(means[5, 0] - means[0, 0])
    mid_edge = (means[0] + means[1]) / 2
    cell_centre = (means[0] + means[1] + means[5] + means[6]) / 4
    d = segment_distance(torch.stack([means[0], mid_edge, cell_centre]), means)
    torch.testing.assert_close(d, torch.tensor([0.0, 0.0, spacing / 2], dtype=torch.float64), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# The filter in OneStepPipeline and `onestep sample --filter` (one-step probe, shared `probe_filter`)
# ---------------------------------------------------------------------------------------------------------------


def _one_step_pipeline(teacher: str):
    """A tiny class-conditional OneStepPipeline (8x8) whose model card names `teacher`."""
    from conftest import tiny_unet

    from onestep.denoisers import denoiser_from_pretrained
    from onestep.generators import OneStepGenerator
    from onestep.pipelines import OneStepPipeline

    denoiser = denoiser_from_pretrained(tiny_unet(seed=1), DDPMScheduler(beta_schedule="linear", clip_sample=False))
    return OneStepPipeline.from_generator(OneStepGenerator(denoiser, 2.5), denoiser.scheduler, {"teacher": teacher})


def _direct_scores(pipe, x, denoiser, seed, n):
    """The probe computed by hand: the pipeline's generator drew z first, then the probe's noise."""
    from diffusers.utils.torch_utils import randn_tensor

    generator = torch.Generator().manual_seed(seed)
    randn_tensor((n, *pipe.noise_shape), generator=generator, dtype=torch.float32)
    labels = torch.arange(n) % 10
    with torch.no_grad():
        return probe_scores(x, lambda xs, s: denoiser(xs, s, class_labels=labels),
                            probe_sigmas(denoiser.scheduler.alphas_cumprod), generator)


def test_pipeline_filter_keeps_the_lowest_teacher_probe_scores(tiny_teacher_dir):
    from onestep.denoisers import load_teacher
    from onestep.pipelines.onestep import FilteredImagePipelineOutput

    pipe = _one_step_pipeline(tiny_teacher_dir)
    plain = pipe(batch_size=7, generator=torch.Generator().manual_seed(3), output_type="raw").images
    out = pipe(batch_size=7, generator=torch.Generator().manual_seed(3), output_type="raw",
               hallucination_filter=HalFilter(keep_n=4))
    assert isinstance(out, FilteredImagePipelineOutput) and out.images.shape == (4, 1, 8, 8)
    expected = _direct_scores(pipe, plain, load_teacher(tiny_teacher_dir), 3, 7)
    assert out.hallucination_scores.dtype == torch.float64 and out.hallucination_scores.shape == (7,)
    torch.testing.assert_close(out.hallucination_scores, expected, rtol=1e-6, atol=0)
    assert out.kept.tolist() == sorted(torch.argsort(expected)[:4].tolist())
    assert torch.equal(out.images, plain[out.kept])
    assert out.hallucination_probe["denoiser"] == f"teacher {tiny_teacher_dir}"
    assert out.hallucination_probe["sigmas"] == pytest.approx(probe_sigmas(DDPMScheduler().alphas_cumprod))
    pil = pipe(batch_size=5, generator=torch.Generator().manual_seed(0), hallucination_filter=HalFilter(keep_n=2))
    assert len(pil.images) == 2 and pil.kept.shape == (2,)  # decoded outputs are filtered too


def test_pipeline_filter_with_an_explicit_denoiser_and_the_fallback(caplog):
    pipe = _one_step_pipeline("not/a/folder")
    own = pipe.one_step_generator.denoiser
    plain = pipe(batch_size=6, generator=torch.Generator().manual_seed(1), output_type="raw").images
    images, scores, kept, probe = pipe(batch_size=6, generator=torch.Generator().manual_seed(1), output_type="raw",
                                       hallucination_filter=HalFilter(quantile=0.5), hallucination_denoiser=own,
                                       return_dict=False)
    torch.testing.assert_close(scores, _direct_scores(pipe, plain, own, 1, 6), rtol=1e-6, atol=0)
    assert probe["denoiser"] == "the given denoiser"
    assert torch.equal(kept, HalFilter(quantile=0.5)(scores)[0]) and torch.equal(images, plain[kept])
    with caplog.at_level("WARNING"):  # the card's teacher is no folder: the generator's own denoiser, with a warning
        out = pipe(batch_size=6, generator=torch.Generator().manual_seed(1), output_type="raw",
                   hallucination_filter=HalFilter(threshold=float("inf")))
    assert out.hallucination_probe["denoiser"] == "the generator's own denoiser" and len(out.images) == 6
    torch.testing.assert_close(out.hallucination_scores, scores)
    assert "generator's own denoiser, which separates worse" in caplog.text
    assert type(pipe(batch_size=2, output_type="raw")).__name__ == "ImagePipelineOutput"  # no filter, no new fields


def test_cli_filter_writes_the_grid_and_the_scores(tiny_teacher_dir, tmp_path, capsys):
    import json

    from onestep.cli import main

    folder = tmp_path / "pipeline"
    _one_step_pipeline(tiny_teacher_dir).save_pretrained(folder)
    grid = tmp_path / "grid.png"
    assert main(["sample", str(folder), "-n", "4", "--out", str(grid), "--filter", "keep", "--oversample", "1.5",
                 "--seed", "2"]) == 0
    report = json.loads((tmp_path / "grid.scores.json").read_text())
    assert grid.is_file() and report["generated"] == 6 and len(report["scores"]) == 6
    assert report["kept"] == sorted(np.argsort(report["scores"], kind="stable")[:4].tolist())
    assert report["filter"] == "keep" and report["denoiser"] == f"teacher {tiny_teacher_dir}"
    assert len(report["probe_sigmas"]) == 20 and "4 of 6 samples kept" in capsys.readouterr().out
    assert main(["sample", str(folder), "-n", "5", "--out", str(tmp_path / "q.png"), "--filter", "quantile:0.6",
                 "--teacher", tiny_teacher_dir]) == 0
    assert len(json.loads((tmp_path / "q.scores.json").read_text())["kept"]) == 3  # of 5: <= the 0.6-quantile
    bad = {("--filter", "keep:3"): "--filter must be keep, quantile:Q",
           ("--filter", "quantile:1.5"): "--filter must be", ("--filter", "threshold:abc"): "--filter must be",
           ("--filter", "median"): "--filter must be", ("--filter", "keep", "--oversample", "0.5"): "--oversample",
           ("--teacher", tiny_teacher_dir): "needs --filter"}
    for extra, message in bad.items():
        assert main(["sample", str(folder), "-n", "4", "--out", str(tmp_path / "bad.png"), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert main(["sample", str(folder), "-n", "4", "--out", str(tmp_path / "dir"), "--filter", "keep"]) == 2
    assert "grid PNG" in capsys.readouterr().err and not (tmp_path / "bad.png").exists()


# ---------------------------------------------------------------------------------------------------------------
# 1-D acceptance (issue: T=1000, 20k points, std 0.05, fixed seeds; AUROC >= 0.93, >= 70 % of hallucinations
# removed at 96 % in-support retention; hallucinations in the gaps, near gaps denser than far ones)
# ---------------------------------------------------------------------------------------------------------------


def _one_d_run(means, width, batch_size, lr):
    """Train (10k steps, cosine-decayed lr, 20k points) and sample 20k with T=1000 ancestral DDPM."""
    data = gaussian_1d(means, 20_000, generator=torch.Generator().manual_seed(1234))
    model = Decoder(dim=1, width=width)
    train_ddpm(model, data, 10_000, batch_size, lr, cosine=True, generator=torch.Generator().manual_seed(1234))
    pipe = ToyDDPMPipeline(model)
    with HalMonitor(pipe, window=LastK(10)) as monitor:
        x = pipe(20_000, generator=torch.Generator().manual_seed(0))
    labels = hallucinated(x, torch.tensor(means), 0.05)
    scores = monitor.scores()
    tau = torch.quantile(scores[~labels], 0.96)
    return {"x": x, "labels": labels, "auroc": roc_auc_score(labels.numpy(), scores.numpy()),
            "removed": float((scores[labels] > tau).double().mean()), "gaps": gap_densities(x, means)}


def _assert_acceptance(run):
    assert run["labels"].sum() >= 10, "too few hallucinations to measure"
    assert run["auroc"] >= 0.93, run["auroc"]
    assert run["removed"] >= 0.70, run["removed"]
    assert all(density > 0 for _, _, density in run["gaps"]), run["gaps"]  # mass in every gap


def test_one_d_acceptance_small():
    """{1,2,3} with a half-width network (64; batch 500, lr 2e-3): about 1.5 CPU minutes."""
    _assert_acceptance(_one_d_run((1.0, 2.0, 3.0), 64, 500, 2e-3))


@pytest.mark.slow
@pytest.mark.parametrize("means", [(1.0, 2.0, 3.0), (1.0, 2.0, 4.0, 5.0)], ids=["123", "1245"])
def test_one_d_acceptance_full(means):
    """The bench's acceptance teacher (the paper's width 128 and lr 1e-3, batch 1000): ~4 CPU minutes each."""
    run = _one_d_run(means, 128, 1000, 1e-3)
    _assert_acceptance(run)
    if len(means) == 4:  # near gaps (1,2), (4,5) denser per unit length than the far gap (2,4)
        near, far, near2 = (density for _, _, density in run["gaps"])
        assert min(near, near2) > far, run["gaps"]


def test_probe_levels_follow_the_teachers_schedule():
    ddpm = probe_levels(DDPMScheduler(beta_schedule="linear"))  # last 5 timesteps 4..0, 4 draws each
    assert len(ddpm) == 20 and ddpm[:5] == sorted(ddpm[:5], reverse=True) and ddpm == ddpm[:5] * 4
    assert ddpm[4] == pytest.approx(1e-2, rel=1e-3)
    assert probe_levels(FlowMatchEulerDiscreteScheduler()) == list(FALLBACK_PROBE_SIGMAS)
