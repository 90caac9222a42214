"""Two real CPU processes (gloo) through `accelerate launch`, for every method of the contract (each variant's
smoke recipe): DDP keeps every rank's weights identical, gradient accumulation included (DDP synchronises on the
last micro-batch only)."""
import pytest
import yaml

from distributed import assert_ranks_identical, run_two_processes
from test_method_contract import contract_cases, contract_recipe


@pytest.mark.parametrize("name,variant", contract_cases())
def test_two_cpu_processes_end_with_identical_parameters(name, variant, method_teachers, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    accumulate = 2 if variant in (None, "ui") else 1
    recipe.write_text(yaml.safe_dump(contract_recipe(name, variant, method_teachers, tmp_path / "run",
                                                     gradient_accumulation_steps=accumulate)))
    assert_ranks_identical(run_two_processes(recipe, tmp_path / "run", []))
    assert (tmp_path / "run" / "pipeline" / "model_index.json").is_file()  # the main process exported
