"""Real teacher classes on tiny random components (nothing downloaded): SD-style latent text-to-image with
guidance, v-prediction, SD3-style flow transformer, pixel DDPM; LoRA students."""
from pathlib import Path

import pytest
import torch

import tiny_teachers as tt
from onestep.conditioning import PromptEncoder
from onestep.denoisers import GuidedDenoiser, load_teacher
from onestep.generators import OneStepGenerator
from onestep.lora import add_lora, has_lora, load_lora, merge_lora, save_lora

BUILDERS = {"sd": tt.stable_diffusion, "sd_vpred": lambda p: tt.stable_diffusion(p, "v_prediction"),
            "sd3": tt.stable_diffusion_3, "ddpm": tt.pixel_ddpm}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    return {name: build(root / name) for name, build in BUILDERS.items()}


def _text_cond(path, teacher, prompts=("a red circle", "a blue square")):
    encoder = PromptEncoder.from_pretrained(path, network=teacher.model)
    return encoder(list(prompts))


@pytest.mark.parametrize("name", ["sd", "sd_vpred", "sd3"])
def test_generator_at_init_reproduces_the_teachers_x0_prediction(teachers, name):
    """G(z) = D(sigma_init z, sigma_init): the model sees a * sigma_init * z at t_init; converting its output with the
    scheduler's own formula (not ours) gives the same x0."""
    teacher = load_teacher(teachers[name])
    cond, _ = _text_cond(teachers[name], teacher)
    generator = OneStepGenerator(teacher, 2.5)
    z = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor(generator.sigma_init)
    a, s = (float(c) for c in teacher.schedule.coefficients(sigma))
    t = teacher.schedule.timestep(sigma).expand(2)
    scheduler = teacher.scheduler
    with torch.no_grad():
        x_t = a * generator.sigma_init * z
        out = teacher.model(x_t, timestep=t, return_dict=False, **cond)[0]
        if name == "sd3":   # FlowMatchEuler: x0 = x_t - t_flow * v  (diffusers' flow convention)
            expected = x_t - (float(t[0]) / scheduler.config.num_train_timesteps) * out
        else:               # DDPM: the scheduler's own step() gives pred_original_sample at integer t
            expected = scheduler.step(out, int(t[0]), x_t).pred_original_sample
        torch.testing.assert_close(generator(z, **cond), expected, rtol=1e-4, atol=1e-4)


def test_prompts_change_the_conditioning(teachers):
    teacher = load_teacher(teachers["sd"])
    cond, uncond = _text_cond(teachers["sd"], teacher)
    e = cond["encoder_hidden_states"]
    assert e.shape[0] == 2 and not torch.allclose(e[0], e[1])
    assert uncond["encoder_hidden_states"].shape == e.shape


def test_guided_teacher_is_the_cfg_combination(teachers):
    teacher = load_teacher(teachers["sd"])
    cond, uncond = _text_cond(teachers["sd"], teacher)
    guided = GuidedDenoiser(teacher, 3.0, {k: v[:1] for k, v in uncond.items()})
    x = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.5, 2.0])
    with torch.no_grad():
        c = teacher(x, sigma, **cond)
        u = teacher(x, sigma, **uncond)
        torch.testing.assert_close(guided(x, sigma, **cond), u + 3.0 * (c - u), rtol=1e-4, atol=1e-5)
    assert not isinstance(guided.clone(), GuidedDenoiser)  # students start from the unguided network


def test_lora_student_trains_few_parameters_and_merges_exactly(teachers, tmp_path):
    teacher = load_teacher(teachers["sd"])
    cond, _ = _text_cond(teachers["sd"], teacher)
    student = teacher.clone()
    full = sum(p.numel() for p in student.parameters())
    add_lora(student.model, rank=4)
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    assert 0 < trainable < 0.25 * full
    with torch.no_grad():  # training moves the adapters (B starts at 0)
        for n, p in student.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    x = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        attached = student(x, 1.0, **cond)
        save_lora(student.model, tmp_path)                      # adapter kept as its own safetensors file ...
        reloaded = load_teacher(teachers["sd"])
        load_lora(reloaded.model, tmp_path)
        assert has_lora(reloaded.model)
        torch.testing.assert_close(reloaded(x, 1.0, **cond), attached, rtol=1e-6, atol=1e-6)
        merged = merge_lora(student.model)                      # ... or merged into the weights
        assert not has_lora(merged) and not any("lora" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(student(x, 1.0, **cond), attached, rtol=1e-5, atol=1e-5)


# --- every real-teacher recipe: 2 steps, export, 1-step sampling; and the same on two CPU processes -----------
RECIPES = {  # recipe -> (tiny teacher of the same classes, overrides that swap in offline data)
    "cifar10_ddpm_sid.yaml": ("ddpm", ["data.name=digits", "data.resolution=8", "data.channels=3"]),
    "sd15_dmd2_lora.yaml": ("sd", []),
    "sd21_vpred_sid.yaml": ("sd_vpred", []),
    "sd3_flow_sid.yaml": ("sd3", []),
}


def _overrides(teachers, recipe, prompts):
    name, extra = RECIPES[recipe]
    data = [] if extra else [f"data.name=prompts:{prompts}"]
    return [f"teacher.path={teachers[name]}", "train.steps=2", "train.batch_size=2", "train.checkpoint_every=2",
            "train.sample_every=2", "train.num_sample_images=2", "train.mixed_precision=no", "eval.enabled=false",
            *data, *extra]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return tt.prompts_file(tmp_path_factory.mktemp("prompts") / "prompts.txt")


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_exports_and_samples(teachers, prompts, recipe, tmp_path):
    from onestep.pipelines import OneStepPipeline
    from onestep.resources import recipe_path
    from onestep.training.config import load_config
    from onestep.training.trainer import Trainer

    config = load_config(recipe_path(recipe), [f"output_dir={tmp_path}", *_overrides(teachers, recipe, prompts)])
    result = Trainer(config).train()
    assert result["skipped_updates"] == 0
    pipe = OneStepPipeline.from_pretrained(tmp_path / "pipeline")
    text = {"prompt": ["a red circle", "a small dog"]} if pipe.prompt_encoder is not None else {"batch_size": 2}
    images = pipe(**text, generator=torch.Generator().manual_seed(0), output_type="pt").images
    expected = (2, 3, 8, 8) if recipe.startswith("cifar") else (2, 3, 16, 16)  # latents decoded to pixels
    assert images.shape == expected and torch.isfinite(images).all()
    if pipe.prompt_encoder is not None:
        again = pipe(prompt=["a red circle", "a blue square"], generator=torch.Generator().manual_seed(0),
                     output_type="pt").images
        assert torch.equal(again[0], images[0]) and not torch.equal(again[1], images[1])  # the prompt matters


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_on_two_cpu_processes_keeps_ranks_identical(teachers, prompts, recipe, tmp_path):
    from distributed import assert_ranks_identical, run_two_processes
    from onestep.resources import recipe_path

    assert_ranks_identical(run_two_processes(recipe_path(recipe), tmp_path, _overrides(teachers, recipe, prompts)))
