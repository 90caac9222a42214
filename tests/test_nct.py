"""Noise Consistency Training (onestep/methods/nct.py), its control models (onestep/controls.py), adapters
(onestep/adapters.py) and the controlled pipeline (onestep/pipelines/controlled.py).

The core oracle is analytic: an identity generator in 2-D (x = z ~ N(0, I)) and the control c = x1 + 0.3 eta. The
conditional law x1 | c is N(c / 1.09, 0.09 / 1.09), and x2 stays N(0, 1) whatever c is; NCT with a zero-initialised
MLP adapter must produce it from independent (noise, control) pairs, and the paper's two ablations (Luo et al. 2025,
Table 3) must fail the way the paper says: without L_con the control is ignored, without L_bound the marginal drifts.
"""
import math

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel, UNet2DModel
from PIL import Image
from torch import nn

from onestep import controls
from onestep.adapters import ResidualAdapter, attached, make_adapter
from onestep.methods.nct import diffuse, distance, dual_update, nct_losses, noise_levels
from onestep.pipelines import ControlledOneStepPipeline, OneStepPipeline, load_pipeline

S = 0.3  # control noise of the 2-D oracle


# --- control models ---------------------------------------------------------------------------------------------
def test_controls_on_known_images():
    flat = torch.full((2, 1, 8, 8), 0.3)
    assert torch.equal(controls.sobel(flat), -torch.ones_like(flat))            # no gradient, no edge
    assert torch.equal(controls.canny(flat), -torch.ones_like(flat))
    step = -torch.ones(1, 1, 8, 8)
    step[..., 4:] = 1.0                                                           # a vertical edge between 3 and 4
    edges = controls.canny(step)
    assert set(edges.unique().tolist()) == {-1.0, 1.0}
    cols = (edges[0, 0] > 0).any(0).nonzero().flatten().tolist()
    assert cols and all(c in (3, 4) for c in cols) and len(cols) <= 2           # thin: non-maximum suppression
    assert controls.sobel(step)[0, 0, :, 3:5].min() > 0.9                        # soft edges where the step is
    x = torch.rand(3, 2, 8, 8) * 2 - 1
    low = controls.lowres(x, 4)
    assert torch.allclose(low[..., :4, :4], x[..., :4, :4].mean((-1, -2), keepdim=True).expand(-1, -1, 4, 4))
    assert torch.allclose(controls.blur(flat, 1.0), flat)                         # constants survive a blur
    rgb = torch.zeros(1, 3, 4, 4)
    rgb[:, 0] = 1.0
    assert torch.allclose(controls.brightness(rgb, 1), torch.full((1, 1, 4, 4), 0.299))


def test_control_specs_callables_and_bad_options():
    model = controls.control_model({"name": "lowres", "factor": 2})
    assert model.spec == {"name": "lowres", "factor": 2} and model.channels(3) == 3
    assert controls.control_model("canny").channels(3) == 1
    mine = controls.control_model(lambda x: -x)
    assert torch.equal(mine(torch.ones(1, 1, 4, 4)), -torch.ones(1, 1, 4, 4))
    controls.register_control("negative_test", lambda x: -x)
    assert "negative_test" in controls.available_controls()
    with pytest.raises(ValueError, match="unknown control model 'edges'; valid: .*canny.*sobel"):
        controls.control_model("edges")
    with pytest.raises(ValueError, match="control lowres: unknown option.*sigma; valid: factor"):
        controls.control_model({"name": "lowres", "sigma": 2})
    with pytest.raises(ValueError, match="control lowres: factor must be a whole number"):
        controls.control_model({"name": "lowres", "factor": 2.5})
    with pytest.raises(ValueError, match="must return maps"):
        controls.control_model(lambda x: x[:, :, :2])(torch.zeros(1, 1, 4, 4))


# --- the noise path and the dual update ---------------------------------------------------------------------------
def test_noise_levels_keep_z_t_standard_normal_and_share_eps():
    alpha, sigma = noise_levels(20)
    assert alpha[0] == 1 and sigma[0] == 0 and alpha[-1] == 0 and sigma[-1] == 1
    assert torch.allclose(alpha.square() + sigma.square(), torch.ones(21, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(100_000, 1, generator=g), torch.randn(100_000, 1, generator=g)
    for k in (0, 5, 13, 20):
        zt = diffuse(z, eps, alpha[k].expand(len(z)), sigma[k].expand(len(z)))
        assert abs(zt.mean()) < 0.01 and abs(zt.var() - 1) < 0.02
        assert abs(torch.corrcoef(torch.cat([zt, z], 1).T)[0, 1] - alpha[k]) < 0.01
    assert torch.equal(diffuse(z, eps, alpha[:1].expand(len(z)), sigma[:1].expand(len(z))), z)
    k = torch.randint(1, 20, (len(z),), generator=g)
    hi, lo = diffuse(z, eps, alpha[k + 1], sigma[k + 1]), diffuse(z, eps, alpha[k], sigma[k])
    a = (hi - alpha[k + 1].float().reshape(-1, 1) * z) / sigma[k + 1].float().reshape(-1, 1)
    b = (lo - alpha[k].float().reshape(-1, 1) * z) / sigma[k].float().reshape(-1, 1)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_dual_update_is_projected_ascent_on_the_margin():
    lam = torch.tensor(1.0, dtype=torch.float64)
    history = []
    for _ in range(40):  # below the margin: down by eta (xi - L_bound) per step, then clamped at 0
        lam = dual_update(lam, l_bound=0.02, margin=0.05, step_size=1.0)
        history.append(float(lam))
    assert history[:3] == pytest.approx([0.97, 0.94, 0.91]) and history[-1] == 0.0 and min(history) == 0.0
    lam = torch.tensor(0.0, dtype=torch.float64)
    for _ in range(4):   # above: up linearly
        lam = dual_update(lam, l_bound=0.15, margin=0.05, step_size=0.5)
    assert float(lam) == pytest.approx(0.2)


def test_distances():
    a, b = torch.zeros(2, 4), torch.tensor([[0.0, 0, 0, 0], [1.0, 1, 1, 1]])
    assert distance(a, b, "l2").tolist() == [0.0, 1.0]
    assert distance(a, b, "pseudo_huber", huber_c=1.0).tolist() == pytest.approx([0.0, math.sqrt(5) - 1])


# --- adapters: zero-init identity, gradient routing, both base classes --------------------------------------------
def _tiny_unet2d():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=10).requires_grad_(False)


def _tiny_unet_condition():
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, norm_num_groups=8, cross_attention_dim=16, attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).requires_grad_(False)


def _perturb_outputs(adapter):
    """Non-zero output convolutions (as after some training), so residuals are not zero."""
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
                p.normal_(0, 0.05)


@pytest.mark.parametrize("kind", ["UNet2DModel", "UNet2DConditionModel"])
def test_zero_init_adapter_is_the_base_bit_for_bit_and_only_it_learns(kind):
    if kind == "UNet2DModel":
        unet, cond, control = _tiny_unet2d(), {"class_labels": torch.arange(3)}, torch.rand(3, 2, 8, 8) * 2 - 1
        adapter = make_adapter(unet, 2)
        assert isinstance(adapter, ResidualAdapter)
        x = torch.randn(3, 1, 8, 8)
    else:  # a latent base: the control is at 2x the network's resolution (as SD's at 8x)
        unet, cond = _tiny_unet_condition(), {"encoder_hidden_states": torch.randn(3, 5, 16)}
        control = torch.rand(3, 3, 16, 16) * 2 - 1
        adapter = make_adapter(unet, 3, downscale=2)
        assert isinstance(adapter, ControlNetModel)
        x = torch.randn(3, 4, 8, 8)
    t = torch.full((3,), 500.0)
    base = unet(x, t, **cond).sample
    with attached(unet, [(adapter, control, 1.0)]):
        adapted = unet(x, t, **cond).sample
    assert torch.equal(adapted, base)                                 # zero-init: exactly the base
    with attached(unet, [(adapter, None, 1.0)]):
        assert torch.equal(unet(x, t, **cond).sample, base)
    _perturb_outputs(adapter)
    with attached(unet, [(adapter, control, 1.0)]):
        out = unet(x, t, **cond).sample
    assert (out - base).abs().max() > 1e-3                            # the residuals reach the output
    out.square().mean().backward()
    assert all(p.grad is None for p in unet.parameters())             # the base stays frozen
    grads = [p.grad for p in adapter.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    with attached(unet, [(adapter, control, 0.0)]):                   # scale 0 switches it off
        assert torch.allclose(unet(x, t, **cond).sample, base, atol=1e-6)
    assert torch.equal(unet(x, t, **cond).sample, base)               # hooks are gone after the block


def test_adapter_saves_and_loads(tmp_path):
    adapter = make_adapter(_tiny_unet2d(), 1)
    _perturb_outputs(adapter)
    adapter.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    again = ResidualAdapter.from_pretrained(tmp_path)
    for (n, a), b in zip(adapter.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), n


# --- the method on a tiny export: only the adapter gets gradients -------------------------------------------------
class _Ctx:
    def __init__(self, method, seed=0):
        self.method, self.rng, self.step = method, torch.Generator().manual_seed(seed), 0

    def net(self, name):
        return self.method.adapter

    def update(self, name, loss_fn, batch):
        self.loss, logs = loss_fn(batch)
        self.loss.backward()
        return logs

    def mean_across_processes(self, value):
        return value


def _method(tiny_export_dir, **overrides):
    from onestep.data import load_dataset
    from onestep.methods.nct import NCTConfig, NoiseConsistencyTraining
    from onestep.teachers import open_teacher
    from onestep.training.config import TeacherConfig

    data = load_dataset("digits", 8)
    teacher = open_teacher(TeacherConfig(path=tiny_export_dir), "one_step", "cpu", data)
    config = NCTConfig(control={"name": "lowres", "factor": 2}, num_levels=4, **overrides)
    return NoiseConsistencyTraining(config, teacher, data), data


def test_method_step_trains_only_the_adapter_and_updates_lambda(tiny_export_dir, one_thread):
    from onestep.methods.base import batch_from_data

    method, data = _method(tiny_export_dir, margin=0.0, dual_lr=0.5)
    base = method.base.denoiser.model
    before = {k: v.clone() for k, v in base.state_dict().items()}
    _perturb_outputs(method.adapter)
    ctx = _Ctx(method)
    batch = batch_from_data(data, torch.arange(6))
    logs = method.step(batch, ctx)
    assert logs["loss/con"] > 0 and logs["loss/bound"] > 0
    assert all(p.grad is None for p in base.parameters())
    assert all(p.grad is not None for p in method.adapter.parameters())
    assert logs["dual/lambda"] == pytest.approx(1.0 + 0.5 * logs["loss/bound"])   # lambda + eta (L_bound - 0)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())
    state = method.state_dict()
    method.lam = torch.tensor(7.0, dtype=torch.float64)
    method.load_state_dict(state)
    assert float(method.lam) == pytest.approx(logs["dual/lambda"])


def test_zero_init_method_has_zero_boundary_loss(tiny_export_dir, one_thread):
    from onestep.methods.base import batch_from_data

    method, data = _method(tiny_export_dir)
    logs = method.step(batch_from_data(data, torch.arange(6)), _Ctx(method))
    assert logs["loss/bound"] == 0.0 and logs["loss/con"] > 0       # f_phi = f exactly; adjacent levels differ


def test_stop_gradient_target(one_thread):
    """L_con's gradient comes only from the higher level: the same as with the lower level's output given as a
    constant."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(3, 16), nn.SiLU(), nn.Linear(16, 2))
    f = lambda z, c: z + mlp(torch.cat([z, c], 1))  # noqa: E731
    alpha, sigma = noise_levels(5)
    z, eps, c, k = torch.randn(8, 2), torch.randn(8, 2), torch.randn(8, 1), torch.randint(0, 5, (8,))
    l_con, _ = nct_losses(f, z, eps, z, c, k, alpha, sigma, "l2", boundary=False)
    l_con.mean().backward()
    auto = [p.grad.clone() for p in mlp.parameters()]
    mlp.zero_grad()
    target = f(diffuse(z, eps, alpha[k], sigma[k]), c).detach()
    distance(f(diffuse(z, eps, alpha[k + 1], sigma[k + 1]), c), target, "l2").mean().backward()
    for a, b in zip(auto, (p.grad for p in mlp.parameters())):
        torch.testing.assert_close(a, b)


# --- the analytic 2-D oracle and its ablations ---------------------------------------------------------------------
def run_toy(steps: int, consistency=True, boundary=True, seed=0):
    """NCT on the identity generator in 2-D with c = x1 + 0.3 eta, a zero-init MLP adapter; returns, for
    c in (-1.5, 0, 1.5), (mean x1, var x1, mean x2, var x2) of 10^4 outputs from independent noise."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(3, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 2))
    nn.init.zeros_(mlp[-1].weight)
    nn.init.zeros_(mlp[-1].bias)
    f = lambda z, c: z + mlp(torch.cat([z, c], 1))  # noqa: E731  (base f(z) = z plus the adapter)
    opt = torch.optim.Adam(mlp.parameters(), lr=1e-3)
    alpha, sigma = noise_levels(20)
    lam = torch.tensor(1.0, dtype=torch.float64)
    for _ in range(steps):
        z, eps = torch.randn(256, 2, generator=g), torch.randn(256, 2, generator=g)
        c = z[:, :1] + S * torch.randn(256, 1, generator=g)                     # C(x) for x = f(z) = z
        k = torch.randint(0, 20, (256,), generator=g)
        l_con, l_bound = nct_losses(f, z, eps, z, c, k, alpha, sigma, "l2", None, consistency, boundary)
        loss = l_con.mean() + (float(lam) if boundary else 0.0) * l_bound.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if boundary:
            lam = dual_update(lam, l_bound.mean().item(), margin=0.02, step_size=0.05)
    out = {}
    with torch.no_grad():
        for value in (-1.5, 0.0, 1.5):
            y = f(torch.randn(10_000, 2, generator=g), torch.full((10_000, 1), value))
            out[value] = (y[:, 0].mean().item(), y[:, 0].var().item(), y[:, 1].mean().item(), y[:, 1].var().item())
    return out


@pytest.mark.slow
def test_two_d_oracle_matches_the_closed_form_conditional(one_thread):
    """~25 s on one thread: x1 | c ~ N(c / (1 + s^2), s^2 / (1 + s^2)) within 0.1, x2 ~ N(0, 1) unchanged."""
    for value, (m1, v1, m2, v2) in run_toy(1500).items():
        assert abs(m1 - value / (1 + S**2)) < 0.1, (value, m1)
        assert abs(v1 - S**2 / (1 + S**2)) < 0.1, (value, v1)
        assert abs(m2) < 0.1 and abs(v2 - 1) < 0.1, (value, m2, v2)


def test_ablation_without_consistency_the_control_is_ignored(one_thread):
    for value, (m1, v1, m2, v2) in run_toy(200, consistency=False).items():
        assert abs(m1) < 0.05 and abs(v1 - 1) < 0.05, (value, m1, v1)   # x1 ~ N(0, 1) whatever c says


def test_ablation_without_boundary_the_marginal_drifts(one_thread):
    stats = run_toy(300, boundary=False)
    worst = max(max(abs(m2), abs(v2 - 1)) for (_, _, m2, v2) in stats.values())
    assert worst > 1.0, stats                                            # x2 is no longer N(0, 1)


# --- the controlled pipeline ---------------------------------------------------------------------------------------
def _pipeline(n_adapters=2):
    components = ControlledOneStepPipeline.dummy_components()
    pipe = ControlledOneStepPipeline(**components)
    if n_adapters == 2:
        second = make_adapter(components["unet"], 1)
        torch.manual_seed(2)
        _perturb_outputs(second)
        pipe.add_adapter(second, {"name": "lowres", "factor": 2}, scale=0.5)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_with_two_adapters_saves_loads_and_scales(tmp_path, one_thread):
    pipe = _pipeline()
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    edges, low = torch.rand(3, 1, 8, 8) * 2 - 1, torch.rand(1, 1, 8, 8) * 2 - 1
    both = pipe.generate(z, class_labels=[1, 2, 3], control_image=[edges, low])
    first = pipe.generate(z, class_labels=[1, 2, 3], control_image=[edges, None])
    off = pipe.generate(z, class_labels=[1, 2, 3], control_image=[edges, low], adapter_scale=[1.0, 0.0])
    torch.testing.assert_close(off, first, rtol=0, atol=1e-6)
    assert (both - first).abs().max() > 1e-4
    base = OneStepPipeline(unet=pipe.unet, scheduler=pipe.scheduler, sigma_init=pipe.config.sigma_init)
    assert torch.equal(pipe.generate(z, class_labels=[1, 2, 3]), base.generate(z, class_labels=[1, 2, 3]))
    pipe.save_pretrained(tmp_path)
    loaded = load_pipeline(tmp_path)
    assert type(loaded) is ControlledOneStepPipeline and len(loaded.adapters) == 2
    assert loaded.config.controls == [{"name": "sobel"}, {"name": "lowres", "factor": 2}]
    assert loaded.config.adapter_scales == [1.0, 0.5]
    assert torch.equal(loaded.generate(z, class_labels=[1, 2, 3], control_image=[edges, low]), both)
    assert loaded.extra_inputs == {"control_image": "image"}


def test_pipeline_control_inputs_are_checked(one_thread):
    pipe = _pipeline(1)
    z = torch.randn(2, 1, 8, 8)
    picture = Image.new("RGB", (20, 12), (200, 10, 10))
    out = pipe.generate(z, class_labels=[0, 1], control_image=picture)       # resized, made gray
    assert out.shape == (2, 1, 8, 8)
    extracted = pipe.extract_control([picture])
    assert extracted.shape == (1, 1, 8, 8)
    with pytest.raises(ValueError, match=r"control_image must have shape \[n, 1, 8, 8\]"):
        pipe.generate(z, class_labels=[0, 1], control_image=torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="got 3 controls for 2 samples"):
        pipe.generate(z, class_labels=[0, 1], control_image=torch.zeros(3, 1, 8, 8))
    with pytest.raises(ValueError, match=r"values must be finite and in \[-1, 1\]"):
        pipe.generate(z, class_labels=[0, 1], control_image=torch.full((2, 1, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="adapter_scale: one number per adapter"):
        pipe.generate(z, class_labels=[0, 1], control_image=picture, adapter_scale=[1.0, 2.0])
    with pytest.raises(ValueError, match="adapter_scale\\[0\\] must be a finite number"):
        pipe.generate(z, class_labels=[0, 1], control_image=picture, adapter_scale=float("inf"))
    with pytest.raises(ValueError, match="unknown control model"):
        ControlledOneStepPipeline(**{**ControlledOneStepPipeline.dummy_components(), "controls": [{"name": "x"}]})
    two = _pipeline(2)
    with pytest.raises(ValueError, match="this pipeline has 2 adapters; pass a list"):
        two.generate(z, class_labels=[0, 1], control_image=picture)


def test_sample_cli_with_a_control_image(tmp_path, one_thread, capsys):
    from onestep.cli import main

    pipe = _pipeline(1)
    pipe.save_pretrained(tmp_path / "pipe")
    Image.new("L", (8, 8), 40).save(tmp_path / "c.png")
    assert main(["sample", str(tmp_path / "pipe"), "-n", "4", "--out", str(tmp_path / "g.png"),
                 "--control", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "g.png").is_file()
    (tmp_path / "folder").mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16), (i * 100, 50, 50)).save(tmp_path / "folder" / f"{i}.png")
    assert main(["sample", str(tmp_path / "pipe"), "-n", "4", "--out", str(tmp_path / "h.png"),
                 "--control", str(tmp_path / "folder"), "--control-from-image"]) == 0
    capsys.readouterr()
    assert main(["sample", str(tmp_path / "pipe"), "-n", "4", "--out", str(tmp_path / "i.png"),
                 "--control", str(tmp_path / "missing.png")]) != 0
    assert "--control" in capsys.readouterr().err


def test_demo_takes_an_uploaded_control_image(tmp_path, one_thread):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "demo"))
    import app as demo_app

    _pipeline(1).save_pretrained(tmp_path / "pipe")
    demo = demo_app.Demo(tmp_path / "pipe")
    assert demo.caps.extra_inputs == {"control_image": "image"}
    req = demo_app.Request.parse({"seed": 0, "num_images": 2, "steps": 1, "class_label": "3",
                                  "control_image": Image.new("RGB", (32, 32), (255, 255, 255))}, demo.caps)
    result = demo.generate(req)
    assert len(result.images) == 2
    with pytest.raises(ValueError, match="is 4000x10; width and height must be 8..2048"):
        demo_app.Request.parse({"seed": 0, "num_images": 2, "steps": 1, "class_label": "3",
                                "control_image": Image.new("L", (4000, 10))}, demo.caps)
