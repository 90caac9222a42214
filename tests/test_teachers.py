"""Teacher bundles: one folder opened once, in the form the method declares (diffusion, one_step, autoregressive)."""
import pytest
import torch

from onestep.data import load_dataset
from onestep.pipelines import OneStepPipeline
from onestep.teachers import open_teacher
from onestep.training.config import TeacherConfig


def test_an_export_opens_as_a_one_step_source_with_its_sigma_init(tiny_export_dir):
    data = load_dataset("digits", 8)
    source = open_teacher(TeacherConfig(path=tiny_export_dir), "one_step", "cpu", data)
    pipe = OneStepPipeline.from_pretrained(tiny_export_dir)
    assert source.generator.sigma_init == pipe.config.sigma_init
    assert source.num_classes == 10 and source.sample_shape == (1, 8, 8)
    assert torch.equal(data.cond["class_labels"], data.labels)
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(4)
    expected = pipe(latents=z, class_labels=labels, output_type="raw").images
    torch.testing.assert_close(source.generator(z, class_labels=labels), expected)
    assert not any(p.requires_grad for p in source.generator.parameters())


def test_an_export_also_opens_as_a_diffusion_teacher(tiny_export_dir, tiny_teacher_dir):
    """The shipped export lists text_encoder: [null, null]; it has no prompt encoder and its network is a denoiser."""
    teacher = open_teacher(TeacherConfig(path=tiny_export_dir), "diffusion", "cpu", load_dataset("digits", 8))
    reference = open_teacher(TeacherConfig(path=tiny_teacher_dir), "diffusion", "cpu")
    assert teacher.prompts is None and teacher.latents is None and teacher.edges == {}
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 3.0])
    labels = torch.tensor([1, 2])
    torch.testing.assert_close(teacher.denoiser(x, sigma, class_labels=labels),
                               reference.denoiser(x, sigma, class_labels=labels))


def test_the_shipped_export_opens_as_a_teacher():
    from onestep.resources import ASSETS

    teacher = open_teacher(TeacherConfig(path=str(ASSETS / "pipelines" / "digits16")), "one_step", "cpu",
                           load_dataset("digits", 16))
    assert teacher.generator.sigma_init == pytest.approx(2.5, abs=0.01)


def test_a_folder_that_is_not_an_export_is_refused_as_a_one_step_source(tiny_teacher_dir):
    with pytest.raises(ValueError, match="not a onestep export"):
        open_teacher(TeacherConfig(path=tiny_teacher_dir), "one_step", "cpu")


def test_an_autoregressive_teacher_opens_with_class_rows(tmp_path):
    from test_teachers_ar import C, GRID, tiny_lm, tiny_vq

    from onestep.teachers_ar import AutoregressiveTeacher

    AutoregressiveTeacher(tiny_lm("gpt2"), tiny_vq(), C, GRID).save_pretrained(tmp_path / "ar")
    data = load_dataset(f"classes:{C}", num_samples=8)
    bundle = open_teacher(TeacherConfig(path=str(tmp_path / "ar")), "autoregressive", "cpu", data)
    assert bundle.num_classes == C and torch.equal(data.cond["class_labels"], data.labels)
    n, d = bundle.sample_shape
    tokens = bundle.model.sample(torch.arange(2), generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (2, n) and bundle.to_pixels(bundle.model.codebook[tokens]).shape[0] == 2
