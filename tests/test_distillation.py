"""End-to-end distillation measured by a quality number: the 2-D grid generator must cover the teacher's modes."""
import torch

from onestep.data import gaussian_grid_modes, mode_coverage
from onestep.generators import OneStepGenerator
from onestep.resources import recipe_path
from onestep.training.config import load_config
from onestep.training.trainer import Trainer


def test_sid_on_the_gaussian_grid_covers_at_least_90_percent_of_modes(tmp_path):
    trainer = Trainer(load_config(recipe_path("gaussian_grid_sid.yaml"),
                                  ["train.steps=600", f"output_dir={tmp_path}", "train.sample_every=600"]))
    z = torch.randn(5000, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        at_init = OneStepGenerator(trainer.teacher, 2.5)(z)
    trainer.train()
    with torch.no_grad():
        distilled = trainer.ema_network()(z)
    modes = gaussian_grid_modes()
    # a mode counts when >= 20% of its balanced share of samples lands within a third of the grid spacing of it
    covered_init, _ = mode_coverage(at_init, modes, min_fraction=0.2)
    covered, near = mode_coverage(distilled, modes, min_fraction=0.2)
    print(f"modes covered: teacher-initialised generator {covered_init:.2f}, after SiD {covered:.2f} "
          f"({near:.0%} of samples near a mode)")
    assert covered_init < 0.5
    assert covered >= 0.9
    assert (tmp_path / "pipeline" / "model_index.json").is_file() and (tmp_path / "loss_curve.png").is_file()
