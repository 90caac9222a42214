"""Networks of which each step trains a subset (a pool of discriminator heads): the trainer averages their gradients
over processes itself, parameters without a gradient are never stepped (no Adam moment, no weight decay), ranks draw
the subset from the stream they share, refreshed parameters lose their optimizer state, and method state that is not
a network is checkpointed so resume stays exact."""
import torch
import yaml

import sparse_method  # noqa: F401  (registers "sparse_pool")
from distributed import run_two_processes
from onestep.training.config import config_from_dict
from onestep.training.trainer import Trainer, shared_step_generator, step_generator


def _recipe(out, steps=3, **method):
    return {"seed": 0, "output_dir": str(out), "data": {"name": "digits", "resolution": 8},
            "method": {"name": "sparse_pool", **method}, "ema": {"decay": 0.9},
            "train": {"steps": steps, "batch_size": 4, "checkpoint_every": 2, "sample_every": 1000, "log_every": 1,
                      "num_sample_images": 4, "keep_checkpoints": 5}, "eval": {"enabled": False}}


def _heads(state: dict, pool_size: int) -> list[dict]:
    return [{k: v for k, v in state.items() if k.startswith(f"heads.{i}.")} for i in range(pool_size)]


def test_the_shared_stream_depends_on_seed_and_step_only():
    a = torch.randn(4, generator=shared_step_generator(0, 5, "cpu"))
    assert torch.equal(a, torch.randn(4, generator=shared_step_generator(0, 5, "cpu")))
    assert not torch.equal(a, torch.randn(4, generator=shared_step_generator(0, 6, "cpu")))
    assert not torch.equal(a, torch.randn(4, generator=step_generator(0, 5, 0, "cpu")))


def test_only_drawn_heads_change(tmp_path, one_thread):
    trainer = Trainer(config_from_dict(_recipe(tmp_path, steps=3)))
    before = _heads({k: v.clone() for k, v in trainer.method.pool.state_dict().items()}, 8)
    trainer.train()
    after = _heads(trainer.method.pool.state_dict(), 8)
    drawn = {h for heads in trainer.method.drawn for h in heads}
    assert 2 <= len(drawn) < 8
    for i in range(8):
        changed = any(not torch.equal(before[i][k], after[i][k]) for k in before[i])
        assert changed == (i in drawn), i  # weight decay and Adam moments never touch an undrawn head


def test_refresh_resets_the_optimizer_state(tmp_path, one_thread):
    trainer = Trainer(config_from_dict(_recipe(tmp_path, steps=4, refresh_every=1)))
    trainer.train()
    optimizer = trainer.optimizers["pool"].optimizer
    last = trainer.method.refreshed[-1]
    for p in trainer.method.pool.heads[last].parameters():
        assert float(optimizer.state[p]["step"]) == 1  # moments started anew at the refresh before the last step
    trainer.reset_optimizer_state("pool", trainer.method.pool.heads[last].parameters())
    assert all(p not in optimizer.state for p in trainer.method.pool.heads[last].parameters())


def test_method_state_is_checkpointed_and_resume_is_exact(tmp_path, one_thread):
    straight = Trainer(config_from_dict(_recipe(tmp_path / "a", steps=4)))
    straight.train()
    Trainer(config_from_dict(_recipe(tmp_path / "b", steps=2))).train()
    resumed = Trainer(config_from_dict(_recipe(tmp_path / "b", steps=4)), resume="latest")
    assert int(resumed.method.steps_taken) == 2
    resumed.train()
    assert int(resumed.method.steps_taken) == 4
    a, b = straight.method.pool.state_dict(), resumed.method.pool.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_train_the_same_subset_and_stay_identical(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tmp_path / "run", steps=3, refresh_every=2)))
    a, b = run_two_processes(recipe, tmp_path / "run", [])
    assert torch.equal(a["drawn"], b["drawn"])  # both ranks drew the same heads each step
    drawn = set(a["drawn"].flatten().tolist())
    for key in [k for k in a if k.startswith("pool.heads.")]:
        assert torch.equal(a[key], b[key]), key
        head = int(key.split(".")[2])
        moved = not torch.equal(a[key], a["initial." + key[len("pool."):]])
        assert moved == (head in drawn), key
