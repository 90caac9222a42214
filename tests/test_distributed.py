"""Two real CPU processes (gloo) through `accelerate launch`: DDP keeps every rank's weights identical."""
import pytest
import yaml

from conftest import tiny_run_config
from distributed import assert_ranks_identical, run_two_processes
from onestep.training.config import dump_config

METHODS = {"sid": dict(loss="sid"), "ui_fkl_gan": dict(loss="ui", divergence="fkl", gan_weight=0.01)}


@pytest.mark.parametrize("method", METHODS)
def test_two_cpu_processes_end_with_identical_parameters(tiny_teacher_dir, tmp_path, method):
    config = tiny_run_config(tiny_teacher_dir, tmp_path, steps=4, generator_optimizer={"lr": 1e-3},
                             fake_optimizer={"lr": 1e-3}, **METHODS[method])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(dump_config(config))
    assert_ranks_identical(run_two_processes(recipe, tmp_path / "run", []))
    assert (tmp_path / "run" / "pipeline" / "model_index.json").is_file()  # the main process exported
    assert yaml.safe_load(recipe.read_text())["method"]["loss"] == METHODS[method]["loss"]
