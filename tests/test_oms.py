"""One More Step (Hu et al., CVPR 2024): the step math, the target alpha-bar, the VP->VE hand-off, key compatibility
with diffusers' UNet2DConditionModel, the optimum of the training objective, the wrapper on a tiny random
StableDiffusionPipeline, and base weights untouched by training. (The end-to-end brightness control on the shipped
flawed teacher is tests/test_oms_brightness.py.)"""
import hashlib
from pathlib import Path

import pytest
import torch

from onestep.oms import TimeFreeUNet2DConditionModel, WordEncoder, oms_step, target_alpha_bar
from onestep.pipelines.oms import OMSPipeline, tiny_oms_components

STEPS = 150  # training steps of the optimum test
TIME_KEYS = ("time_embedding", "time_proj", "time_emb_proj")


# --- 1. step math -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ab", [0.0047, 0.05, 0.3])
def test_step_math(ab):
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x0, x_dag, z = (torch.randn(n, generator=g, dtype=torch.float64) for _ in range(3))
    a, s = ab ** 0.5, (1 - ab) ** 0.5
    assert torch.allclose(oms_step(x0, x_dag, ab, "ddim"), a * x0 + s * x_dag, atol=1e-12)
    const = torch.full((n,), 0.7, dtype=torch.float64)  # a fixed x0: the step's own mean and spread
    ddpm, ref = oms_step(const, x_dag, ab, "ddpm", z), oms_step(const, x_dag, ab, "reference", z)
    assert abs(ddpm.mean() - a * 0.7) < 0.01 * s and abs(ddpm.std() / s - 1) < 0.01
    assert abs(ref.mean() - a * 0.7) < 0.01 * s and abs(ref.std() / (1 - ab) - 1) < 0.01
    for out in (ddpm, ref):  # eta = 1: the input noise is discarded
        assert abs(torch.corrcoef(torch.stack([out, x_dag]))[0, 1]) < 0.01
    with pytest.raises(ValueError, match="oms_mode must be one of"):
        oms_step(x0, x_dag, ab, "euler")
    with pytest.raises(ValueError, match="draws fresh noise"):
        oms_step(x0, x_dag, ab, "ddpm")


# --- 2. target selection ------------------------------------------------------------------------------------------
def _sd_schedule(cls, **kw):
    return cls(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, **kw)


def test_target_alpha_bar_is_the_first_timestep_after_set_timesteps():
    from diffusers import DDIMScheduler, LCMScheduler

    leading = _sd_schedule(DDIMScheduler, steps_offset=1, timestep_spacing="leading")
    assert target_alpha_bar(leading, 20) == pytest.approx(float(leading.alphas_cumprod[951]), abs=0)
    trailing = _sd_schedule(DDIMScheduler, timestep_spacing="trailing")
    assert target_alpha_bar(trailing, 20) == pytest.approx(float(trailing.alphas_cumprod[999]), abs=0)
    lcm = _sd_schedule(LCMScheduler)
    assert target_alpha_bar(lcm, 4) == pytest.approx(float(lcm.alphas_cumprod[999]), abs=0)
    assert float(lcm.alphas_cumprod[999]) == pytest.approx(0.00466, abs=1e-5)  # SD's schedule flaw


def test_flow_matching_is_refused_in_one_line():
    from diffusers import FlowMatchEulerDiscreteScheduler

    with pytest.raises(ValueError, match="flow matching"):
        target_alpha_bar(FlowMatchEulerDiscreteScheduler(), 4)


# --- 3. the VP -> VE hand-off -------------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing,rtol", [("leading", 1e-5), ("trailing", 3e-3)])
def test_sigma_schedulers_scale_vp_latents_to_ve(spacing, rtol):
    from diffusers import EulerDiscreteScheduler

    sched = _sd_schedule(EulerDiscreteScheduler, steps_offset=1, timestep_spacing=spacing)
    ab = target_alpha_bar(sched, 20)
    x = torch.randn(1000, dtype=torch.float64)
    assert torch.allclose(x * float(sched.init_noise_sigma), x / ab ** 0.5, rtol=rtol)


# --- 4. key compatibility with diffusers' naming --------------------------------------------------------------------
LAYOUTS = {
    "tiny": dict(block_out_channels=(32, 64, 64), attention_head_dim=(1, 2, 2), cross_attention_dim=32,
                 norm_num_groups=8, layers_per_block=2),
    "oms_b": dict(block_out_channels=(16, 32, 64), attention_head_dim=[5, 10, 20], cross_attention_dim=24,
                  norm_num_groups=8, layers_per_block=2, transformer_layers_per_block=1),
    "oms_l": dict(block_out_channels=(16, 32, 64), attention_head_dim=[5, 10, 20], cross_attention_dim=40,
                  norm_num_groups=8, layers_per_block=2, transformer_layers_per_block=[1, 2, 10]),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_keys_match_diffusers_unet_without_time(layout):
    from diffusers import UNet2DConditionModel

    config = dict(LAYOUTS[layout], down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    ours = TimeFreeUNet2DConditionModel(**config)
    theirs = UNet2DConditionModel(**config).state_dict()
    expected = {k: v.shape for k, v in theirs.items() if not any(t in k for t in TIME_KEYS)}
    assert {k: v.shape for k, v in ours.state_dict().items()} == expected
    ours.load_state_dict({k: theirs[k] for k in expected}, strict=True)  # released weights load by key
    out = ours(torch.randn(1, 4, 12, 12), torch.randn(1, 3, config["cross_attention_dim"])).sample
    assert out.shape == (1, 4, 12, 12)  # 12 is not a multiple of 4: upsample sizes are forwarded


def test_module_and_word_encoder_round_trip(tmp_path):
    parts = tiny_oms_components(channels=1)
    for name, model in parts.items():
        model.save_pretrained(tmp_path / name)
        loaded = type(model).from_pretrained(tmp_path / name)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert not list(tmp_path.rglob("*.bin"))
    enc = parts["oms_text_encoder"]
    assert torch.equal(enc.tokenize(["Bright"]), enc.tokenize(["bright"]))
    assert not enc.tokenize([""]).any()  # the empty prompt is all padding
    with pytest.raises(ValueError, match="not in this OMS module's vocabulary"):
        enc.tokenize(["a purple circle"])


# --- 5. the optimum is the conditional mean -------------------------------------------------------------------------
@pytest.mark.slow  # ~30 s on one thread
def test_trained_psi_is_minus_the_conditional_mean(tiny_teacher_dir, one_thread):
    """z0 = m_c + 0.3 noise (m = -0.8 dark, +0.8 bright) on the tiny teacher's 1x8x8 space; 150 steps of the
    method's own loss: -psi(eps, c) has spatial mean m_c and hardly depends on eps."""
    from onestep.data.datasets import TensorData
    from onestep.methods.oms import OMSConfig, OneMoreStep
    from onestep.teachers import open_teacher
    from onestep.training.config import TeacherConfig

    g = torch.Generator().manual_seed(0)
    n = 512
    bright = torch.arange(n) % 2 == 1
    m = torch.where(bright, 0.8, -0.8)
    data = TensorData(m.view(-1, 1, 1, 1) + 0.3 * torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % 10, 10,
                      "image", "toy", prompts=["bright" if b else "dark" for b in bright])
    teacher = open_teacher(TeacherConfig(path=tiny_teacher_dir), "latents", "cpu", data)
    before = {k: v.clone() for k, v in teacher.denoiser.model.state_dict().items()}
    method = OneMoreStep(OMSConfig(word_dim=8, model={"block_out_channels": [8, 16], "norm_num_groups": 4,
                                                      "attention_head_dim": [1, 2],
                                                       "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                                                       "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]}),
                         teacher, data)
    net = method.network
    opt = torch.optim.Adam(net.parameters(), lr=5e-3)

    class Ctx:
        rng = torch.Generator().manual_seed(1)

        def net(self, name):
            return net

    from onestep.methods.base import batch_from_data

    for _ in range(STEPS):
        batch = batch_from_data(data, torch.randint(0, n, (16,), generator=g))
        loss, _ = method.loss(batch, Ctx())
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    eps = torch.randn(256, 1, 8, 8, generator=g)
    with torch.no_grad():
        x0 = {w: -net(eps, net.encoder.tokenize([w] * 256)) for w in ("dark", "bright")}
    for word, target in (("dark", -0.8), ("bright", 0.8)):
        assert abs(float(x0[word].mean()) - target) < 0.1, (word, float(x0[word].mean()))
    var_eps = sum(float(v.mean((1, 2, 3)).var()) for v in x0.values()) / 2
    var_c = float(torch.stack([v.mean() for v in x0.values()]).var())
    assert var_eps / var_c < 0.05
    assert all(torch.equal(before[k], v) for k, v in teacher.denoiser.model.state_dict().items())


# --- 7. the wrapper on a tiny random StableDiffusionPipeline ------------------------------------------------------
@pytest.fixture(scope="module")
def sd_and_oms():
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from tiny_teachers import _clip, _vae, char_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    sd = StableDiffusionPipeline(vae=_vae(), text_encoder=_clip(), tokenizer=char_tokenizer(), unet=unet,
                                 scheduler=_sd_schedule(DDIMScheduler, steps_offset=1, clip_sample=False),
                                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    torch.manual_seed(1)
    oms = OMSPipeline(**tiny_oms_components(channels=4, text=True), scheduler=sd.scheduler,
                      unet=tiny_oms_unet_base(), vae=sd.vae, oms_latent_space={"channels": 4, "scaling_factor": 0.18215})
    return sd, oms


def tiny_oms_unet_base():
    """A 4-channel base for the OMSPipeline that holds the OMS module (the wrapper only uses the module)."""
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)


def test_wrapper_off_equals_plain_pipeline_and_runs_every_scheduler(sd_and_oms):
    from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, LCMScheduler, PNDMScheduler

    sd, oms = sd_and_oms
    wrapped = oms.wrap(sd)
    kw = dict(prompt="a red circle", num_inference_steps=3, output_type="np")
    plain = sd(**kw, generator=torch.Generator().manual_seed(0)).images
    off = wrapped(**kw, oms_flag=False, generator=torch.Generator().manual_seed(0)).images
    assert (plain == off).all()
    on = wrapped(**kw, generator=torch.Generator().manual_seed(0)).images
    assert on.shape == plain.shape and not (on == plain).all()
    original = sd.scheduler
    try:
        for cls in (DDIMScheduler, DDPMScheduler, PNDMScheduler, EulerDiscreteScheduler, LCMScheduler):
            sd.scheduler = cls.from_config(original.config, **({"skip_prk_steps": True} if cls is PNDMScheduler else {}))
            out = wrapped(prompt=["a dot", "a square"], oms_prompt="bright", oms_guidance_scale=1.5,
                          num_inference_steps=3, num_images_per_prompt=2, output_type="np",
                          generator=torch.Generator().manual_seed(0)).images
            assert out.shape == (4, 16, 16, 3) and (out >= 0).all() and (out <= 1).all(), cls.__name__
    finally:
        sd.scheduler = original


def test_wrapper_hands_the_oms_latents_at_the_first_timestep(sd_and_oms):
    """The base receives sqrt(ab_S) x0_hat + sqrt(1 - ab_S) x_dag (ddim mode), ab_S read after set_timesteps."""
    from diffusers.utils.torch_utils import randn_tensor

    sd, oms = sd_and_oms
    seen = {}
    original = sd.prepare_latents

    def spy(*args, **kwargs):
        seen["latents"] = kwargs.get("latents", args[-1] if args else None)
        return original(*args, **kwargs)

    sd.prepare_latents = spy
    try:
        oms.wrap(sd)(prompt="a dot", oms_prompt="dot", oms_mode="ddim", num_inference_steps=20, output_type="latent",
                     generator=torch.Generator().manual_seed(3))
    finally:
        del sd.prepare_latents
    ab = float(sd.scheduler.alphas_cumprod[951])  # DDIM leading, steps_offset 1, 20 steps
    x_dag = randn_tensor((1, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    x0 = oms.predict_x0(x_dag, ["dot"])
    assert torch.allclose(seen["latents"], ab ** 0.5 * x0 + (1 - ab) ** 0.5 * x_dag, atol=1e-5)


def test_wrapper_refusals_are_one_line(sd_and_oms):
    from diffusers import StableDiffusionImg2ImgPipeline

    sd, oms = sd_and_oms
    img2img = StableDiffusionImg2ImgPipeline(**sd.components)
    for build, match in ((lambda: oms.wrap(img2img), "img2img"),
                         (lambda: oms.wrap(sd)(prompt="a", latents=torch.zeros(1, 4, 8, 8)), "latents"),
                         (lambda: oms.wrap(sd)(prompt="a", strength=0.5), "strength")):
        with pytest.raises(ValueError, match=match) as err:
            build()
        assert "\n" not in str(err.value)
    sdxl_space = {"channels": 4, "scaling_factor": 0.13025}
    with pytest.raises(ValueError, match="VAE mismatch"):
        OMSPipeline(**oms.oms_components(), scheduler=oms.scheduler, unet=oms.unet, vae=oms.vae,
                    oms_latent_space=sdxl_space)
    oms.register_to_config(oms_latent_space=sdxl_space)
    try:
        with pytest.raises(ValueError, match="VAE mismatch"):
            oms.wrap(sd)
    finally:
        oms.register_to_config(oms_latent_space={"channels": 4, "scaling_factor": 0.18215})
    pixel = OMSPipeline(**tiny_oms_components(channels=1), scheduler=oms.scheduler,
                        unet=OMSPipeline.dummy_components()["unet"])
    with pytest.raises(ValueError, match="latent mismatch"):
        pixel.wrap(sd)
    from diffusers import FlowMatchEulerDiscreteScheduler

    with pytest.raises(ValueError, match="flow matching"):
        OMSPipeline(**oms.oms_components(), scheduler=FlowMatchEulerDiscreteScheduler(), unet=oms.unet)


# --- base weights are never touched --------------------------------------------------------------------------------
def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_base_weights_byte_identical_after_training(tiny_teacher_dir, tmp_path, one_thread):
    from safetensors.torch import load_file

    from onestep.methods.oms import OneMoreStep
    from onestep.pipelines import load_pipeline
    from onestep.training.config import config_from_dict
    from onestep.training.trainer import Trainer

    before = _digest(Path(tiny_teacher_dir))
    recipe = {"seed": 0, "output_dir": str(tmp_path / "run"), **OneMoreStep.smoke_recipe(tiny_teacher_dir),
              "train": {"steps": 3, "batch_size": 4, "checkpoint_every": 3, "sample_every": 1000, "log_every": 1},
              "eval": {"enabled": False}}
    Trainer(config_from_dict(recipe)).train()
    assert _digest(Path(tiny_teacher_dir)) == before
    teacher = load_file(Path(tiny_teacher_dir) / "unet" / "diffusion_pytorch_model.safetensors")
    exported = load_file(tmp_path / "run" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert teacher.keys() == exported.keys() and all(torch.equal(teacher[k], exported[k]) for k in teacher)
    pipe = load_pipeline(tmp_path / "run" / "pipeline")
    assert isinstance(pipe, OMSPipeline) and isinstance(pipe.oms_text_encoder, WordEncoder)
    assert set(pipe.oms_text_encoder.config.vocabulary) == {"bright", "dark"}


def test_protocol_pipeline_is_a_pure_function_and_oms_prompt_steers(one_thread):
    pipe = OMSPipeline(**OMSPipeline.dummy_components())
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(4, *pipe.noise_shape, generator=torch.Generator().manual_seed(0))
    a = pipe.generate_latents(noise, 2, class_labels=[1, 2, 3, 4], oms_prompt="bright")
    assert torch.equal(a, pipe.generate_latents(noise, 2, class_labels=[1, 2, 3, 4], oms_prompt="bright"))
    assert not torch.equal(a, pipe.generate_latents(noise, 2, class_labels=[1, 2, 3, 4], oms_prompt="dark"))
    with pytest.raises(ValueError, match="oms_prompts for 4 samples"):
        pipe.generate_latents(noise, 2, oms_prompt=["dark", "bright"])


def test_cli_sample_takes_base_and_oms_prompt(tiny_teacher_dir, tmp_path, one_thread, capsys):
    from onestep.cli import main

    folder = tmp_path / "oms"
    OMSPipeline(**OMSPipeline.dummy_components()).save_pretrained(folder)
    out = tmp_path / "grid.png"
    assert main(["sample", str(folder), "--base", tiny_teacher_dir, "--steps", "2", "-n", "4", "--out", str(out),
                 "--oms-prompt", "bright", "--oms-guidance-scale", "2"]) == 0
    assert out.is_file()
    capsys.readouterr()
    assert main(["sample", tiny_teacher_dir, "--base", str(folder), "--steps", "2", "-n", "4",
                 "--out", str(tmp_path / "other.png")]) != 0
    assert "apply to One More Step pipelines" in capsys.readouterr().err


def test_demo_takes_base():
    import importlib.util
    import sys

    from onestep.resources import ASSETS, DEMO_APP

    spec = importlib.util.spec_from_file_location("onestep_demo_app", DEMO_APP)
    app = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    demo = app.Demo(ASSETS / "pipelines" / "digits16_oms", base=ASSETS / "teachers" / "digits16_flawed")
    assert isinstance(demo.pipe, OMSPipeline) and demo.caps.extra_inputs == {"oms_prompt": "text",
                                                                              "oms_guidance_scale": "float"}
    with pytest.raises(ValueError, match="applies to One More Step pipelines"):
        app.Demo(ASSETS / "teachers" / "digits16_flawed", base=ASSETS / "teachers" / "digits16_flawed")


def test_brightness_datasets():
    from onestep.data import load_dataset

    data = load_dataset("digits_brightness", 16)
    plain = load_dataset("digits", 16)
    means = data.x.mean((1, 2, 3))
    assert data.x.shape == plain.x.shape and torch.equal(data.labels, plain.labels)
    assert data.prompts == ["bright" if m > 0 else "dark" for m in means.tolist()]
    assert 0.4 < float((means > 0).float().mean()) < 0.6 and float(means.abs().min()) > 0.4
    assert data.x.min() >= -1 and data.x.max() <= 1
    assert torch.equal(data.x, load_dataset("digits_brightness", 16).x)  # deterministic
    shapes = load_dataset("shapes_brightness", 16, num_samples=64)
    assert len(shapes.prompts) == 64 and set(shapes.prompts) <= {"dark", "bright"}
