"""Chained stages: a run starts a network from another run's export or checkpoint (`init_from`), and a onestep
export is the frozen base (teacher) of a second run."""
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_run_config
from onestep.training.config import config_from_dict
from onestep.training.trainer import Trainer


def _recipe(out, teacher, steps=2, **extra):
    config = tiny_run_config(teacher, out, steps=steps, loss="dmd").model_dump(mode="json")
    return {**config, **extra}


def test_an_export_is_the_frozen_base_and_the_start_of_a_second_run(tiny_export_dir, tmp_path):
    """20 steps of Uni-Instruct whose teacher and initial generator are a onestep export (the 20-step smoke run)."""
    from onestep.pipelines import OneStepPipeline

    recipe = _recipe(tmp_path / "run", tiny_export_dir, steps=20, init_from={"generator": tiny_export_dir})
    trainer = Trainer(config_from_dict(recipe))
    exported = OneStepPipeline.from_pretrained(tiny_export_dir).unet.state_dict()
    start = trainer.method.gen.denoiser.model.state_dict()
    assert all(torch.equal(start[k], exported[k]) for k in exported)
    teacher_before = {k: v.clone() for k, v in trainer.method.denoiser.model.state_dict().items()}
    trainer.train()
    after = trainer.method.gen.denoiser.model.state_dict()
    assert any(not torch.equal(after[k], exported[k]) for k in exported)  # the generator trained ...
    teacher_after = trainer.method.denoiser.model.state_dict()
    assert all(torch.equal(teacher_before[k], teacher_after[k]) for k in teacher_before)  # ... the base did not
    assert (tmp_path / "run" / "pipeline" / "model_index.json").is_file()


@pytest.mark.parametrize("weights", ["ema", "raw"])
def test_init_from_a_checkpoint_of_another_method(tiny_teacher_dir, tmp_path, weights):
    """A dsm run's denoiser ("model") starts a Uni-Instruct generator: names are matched through the network."""
    from test_method_contract import contract_recipe

    contract = contract_recipe("dsm", None, {"none": None}, tmp_path / "dsm", steps=2)
    contract["method"]["model"]["num_class_embeds"] = 10
    Trainer(config_from_dict(contract)).train()
    checkpoint = tmp_path / "dsm" / "checkpoints" / "step_0000002"
    source = load_file(checkpoint / ("ema.safetensors" if weights == "ema" else "model.safetensors"))
    recipe = _recipe(tmp_path / "run", tiny_teacher_dir,
                     init_from={"generator": {"path": str(checkpoint), "network": "model", "weights": weights}})
    start = Trainer(config_from_dict(recipe)).method.gen.denoiser.model.state_dict()
    assert all(torch.equal(start[k], source["model." + k]) for k in start)


def test_init_from_names_the_problem_in_one_line(tiny_teacher_dir, tmp_path):
    with pytest.raises(ValueError, match="init_from.critic: method uni_instruct trains no network 'critic'"):
        Trainer(config_from_dict(_recipe(tmp_path / "a", tiny_teacher_dir, init_from={"critic": tiny_teacher_dir})))
    with pytest.raises(FileNotFoundError, match="neither a onestep export"):
        Trainer(config_from_dict(_recipe(tmp_path / "b", tiny_teacher_dir, init_from={"generator": str(tmp_path)})))
