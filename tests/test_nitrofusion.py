"""NitroFusion (onestep/methods/nitrofusion.py): the pool of discriminator heads trains only the heads a step draws (on
one and on two processes), a refresh re-initialises heads and forgets their Adam moments, the generator learns through
the frozen teacher encoder without changing it, the pool indexes every (task, t*, level, slot), and the n-step grids
are diffusers' LCM timesteps moved by the paper's shift. The train/checkpoint/resume/export contract is
tests/test_method_contract.py (smoke variants non_saturating and relativistic)."""
import copy
import itertools
from types import SimpleNamespace

import pytest
import torch
import yaml

from distributed import run_two_processes
from onestep.methods.base import batch_from_data, frozen
from onestep.methods.nitrofusion import NitroFusion, shifted, step_timesteps
from onestep.training.config import config_from_dict
from onestep.training.trainer import Trainer, shared_step_generator, step_generator


def _recipe(teacher, out, steps=3, **method):
    recipe = NitroFusion.smoke_recipe(teacher)
    recipe["method"].update(method)
    return {"seed": 0, "output_dir": str(out), **recipe, "ema": {"decay": 0.9},
            "train": {"steps": steps, "batch_size": 4, "checkpoint_every": 100, "sample_every": 1000, "log_every": 1,
                      "num_sample_images": 4}, "eval": {"enabled": False}}


def _trainer(teacher, out, steps=3, **method) -> Trainer:
    return Trainer(config_from_dict(_recipe(teacher, out, steps, **method)))


def _head_states(pool) -> list[dict]:
    return [{k: v.detach().clone() for k, v in pool[i].state_dict().items()} for i in pool.index]


def _changed(before: dict, after: dict) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before)


def _ctx(trainer, step=0):
    """What the method's helpers read of a StepContext, outside the loop."""
    return SimpleNamespace(step=step, rng=step_generator(0, step, 0, "cpu"),
                           shared_rng=shared_step_generator(0, step, "cpu"), net=lambda name: trainer.prepared[name],
                           reset_optimizer_state=trainer.reset_optimizer_state)


def test_pool_indexes_every_task_level_timestep_and_slot(tiny_teacher_dir, tmp_path, one_thread):
    trainer = _trainer(tiny_teacher_dir, tmp_path, disc_timesteps=[10, 250, 500, 750], slots=4)
    method = trainer.method
    levels = len(method.layers)
    # the UNet's skip-connection tensors: 1 + (1 resnet + 1 downsampler) + 1 resnet + mid = 5 maps
    assert method.layers == ["conv_in", "down_blocks.0.resnets.0", "down_blocks.0.downsamplers.0",
                             "down_blocks.1.resnets.0", "mid_block"]
    assert len(method.pool) == 3 * 4 * levels * 4 == 48 * levels
    expected = set(itertools.product(("global_cond", "local_cond", "local_uncond"), range(4), range(levels), range(4)))
    assert set(method.pool.index) == expected and len(set(method.pool.heads)) == len(expected)
    for step in range(20):
        heads = method.draw_heads(shared_step_generator(0, step, "cpu"))
        assert len({h[1] for h in heads}) == 1                                       # one t* per step
        assert sorted((h[0], h[2]) for h in heads) == sorted(itertools.product(method.config.tasks, range(levels)))
    # conditional heads carry the class projection, local-unconditional ones do not
    assert method.pool[("global_cond", 0, 0, 0)].embed is not None
    assert method.pool[("local_uncond", 0, 0, 0)].embed is None


def test_only_the_drawn_heads_change(tiny_teacher_dir, tmp_path, one_thread):
    trainer = _trainer(tiny_teacher_dir, tmp_path, steps=3, refresh_fraction=0)
    pool = trainer.method.pool
    before = _head_states(pool)
    gen_before = {k: v.clone() for k, v in trainer.method.gen.state_dict().items()}
    trainer.train()
    after = _head_states(pool)
    drawn = {i for step in trainer.method.drawn for i in step}
    assert len(trainer.method.drawn) == 3 and 0 < len(drawn) < len(pool)
    for i in range(len(pool)):
        assert _changed(before[i], after[i]) == (i in drawn), pool.index[i]  # no weight decay / moments elsewhere
    assert any(not torch.equal(v, trainer.method.gen.state_dict()[k]) for k, v in gen_before.items())


def test_discriminator_warmup_leaves_the_generator_and_refresh_every_spaces_refreshes(tiny_teacher_dir, tmp_path,
                                                                                      one_thread):
    trainer = _trainer(tiny_teacher_dir, tmp_path, steps=3, disc_warmup_steps=3, disc_updates=2, refresh_every=2,
                       refresh_fraction=0.05)
    gen_before = {k: v.clone() for k, v in trainer.method.gen.state_dict().items()}
    pool_before = _head_states(trainer.method.pool)
    trainer.train()
    assert all(torch.equal(v, trainer.method.gen.state_dict()[k]) for k, v in gen_before.items())  # heads only
    after = _head_states(trainer.method.pool)
    assert any(_changed(pool_before[i], after[i]) for i in range(len(after)))
    assert [bool(r) for r in trainer.method.refreshed] == [False, True, False]   # steps 1 (of 0..2) only
    counts = {int(s["step"]) for s in trainer.optimizers["pool"].state.values() if "step" in s}
    assert max(counts) % 2 == 0 and max(counts) >= 2


def test_refresh_reinitialises_heads_and_forgets_their_adam_moments(tiny_teacher_dir, tmp_path, one_thread):
    trainer = _trainer(tiny_teacher_dir, tmp_path, steps=4, refresh_fraction=0.05)
    trainer.train()
    method, pool = trainer.method, trainer.method.pool
    count = max(1, round(0.05 * len(pool)))
    assert all(len(r) == count for r in method.refreshed)
    optimizer = trainer.optimizers["pool"].optimizer
    for i in method.refreshed[-1]:  # refreshed after the last update: no moments, no step count
        assert all(p not in optimizer.state for p in pool[pool.index[i]].parameters())
    # one refresh call: exactly `count` heads change, each equal to a fresh init from the drawn seed, state gone
    with_state = {i for i in range(len(pool)) if any(p in optimizer.state for p in pool[pool.index[i]].parameters())}
    assert with_state
    before = _head_states(pool)
    state_before = {id(p): copy.deepcopy(optimizer.state[p]) for p in pool.parameters() if p in optimizer.state}
    ctx = _ctx(trainer, step=99)
    picked = method.refresh(ctx)
    twin = shared_step_generator(0, 99, "cpu")
    expected_picked = sorted(torch.randperm(len(pool), generator=twin)[:count].tolist())
    init = torch.Generator().manual_seed(int(torch.randint(2**62, (), generator=twin)))
    assert picked == expected_picked
    after = _head_states(pool)
    for i in range(len(pool)):
        head = pool[pool.index[i]]
        if i in picked:
            fresh = copy.deepcopy(head)
            fresh.reset(init)
            assert all(torch.equal(after[i][k], v) for k, v in fresh.state_dict().items())
            assert all(p not in optimizer.state for p in head.parameters())
        else:
            assert not _changed(before[i], after[i])
            for p in head.parameters():
                if id(p) in state_before:
                    assert torch.equal(optimizer.state[p]["exp_avg"], state_before[id(p)]["exp_avg"])
    # over many calls every head is refreshed at some point
    seen = set()
    for step in range(100, 100 + 40 * len(pool)):
        seen.update(method.refresh(_ctx(trainer, step)))
        if len(seen) == len(pool):
            break
    assert len(seen) == len(pool)


def test_generator_learns_through_the_frozen_backbone(tiny_teacher_dir, tmp_path, one_thread):
    trainer = _trainer(tiny_teacher_dir, tmp_path, steps=2)
    method = trainer.method
    backbone = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    assert not any(p.requires_grad for p in method.backbone.parameters())
    # the decoder-free pass gives exactly the platform's feature taps
    x = torch.randn(3, *method.sample_shape)
    cond = {"class_labels": torch.tensor([1, 2, 3])}
    sigma = method.disc_sigmas[1]
    taps = method.backbone(x, sigma, return_features=method.layers, **cond)[1]
    assert all(torch.equal(a, b) for a, b in zip(method.features(x, sigma, **cond), taps))
    # one generator loss: gradient on every student tensor that takes part, none on backbone or heads
    ctx = _ctx(trainer)
    batch = method.prepare(batch_from_data(trainer.data, torch.arange(4)), ctx)
    heads = method.draw_heads(ctx.shared_rng)
    with frozen(method.pool):
        loss, _ = method.generator_loss(batch, heads, ctx)
        loss.backward()
    grads = [p.grad for p in method.gen.parameters()]
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    assert all(p.grad is None for p in method.backbone.parameters())
    assert all(p.grad is None for p in method.pool.parameters())
    # the input of the backbone gets a gradient from a head's logit
    x = torch.randn(2, *method.sample_shape, requires_grad=True)
    feats = method.features(x, sigma, class_labels=torch.tensor([0, 1]))
    method.pool[heads[0]](feats[heads[0][2]], {"class_labels": torch.tensor([0, 1])}).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    trainer.method.gen.zero_grad(set_to_none=True)
    trainer.train()
    assert all(torch.equal(v, method.backbone.state_dict()[k]) for k, v in backbone.items())


def test_lcm_grid_matches_diffusers_and_the_shift_table():
    from diffusers import LCMScheduler

    scheduler = LCMScheduler(original_inference_steps=4)
    rows = step_timesteps(1000, 4, "lcm")
    for n, row in enumerate(rows, start=1):
        scheduler.set_timesteps(n, original_inference_steps=4)
        assert row == scheduler.timesteps.tolist()
    assert [[shifted(t, 250) for t in r] for r in rows] == [[249], [249, 124], [249, 187, 124], [249, 187, 124, 62]]
    assert [[shifted(t, 500) for t in r] for r in rows] == [[499], [499, 249], [499, 374, 249], [499, 374, 249, 124]]
    assert step_timesteps(1000, 4, "prefix") == [[999], [999, 749], [999, 749, 499], [999, 749, 499, 249]]


@pytest.mark.parametrize("grid,cls", [("prefix", "OneStepPipeline"), ("lcm", "NitroFusionPipeline")])
def test_export_samples_every_step_count_like_the_method(tiny_teacher_dir, tmp_path, one_thread, grid, cls):
    from onestep.pipelines import load_pipeline

    trainer = _trainer(tiny_teacher_dir, tmp_path, steps=2, grid=grid, max_steps=3, stage_starts=[0, 1])
    trainer.train()
    pipe = load_pipeline(tmp_path / "pipeline")
    assert type(pipe).__name__ == cls and pipe.max_inference_steps == 3
    assert pipe.card["step_timesteps"] == step_timesteps(1000, 3, grid) and "nfe" in pipe.card
    z = torch.randn(3, *pipe.noise_shape, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(3)
    for n in (1, 2, 3):
        assert pipe.sigmas(n) == trainer.method.gen.sigma_rows[n - 1]
        a = pipe.generate(z, n, class_labels=labels, generator=torch.Generator().manual_seed(1))
        b = trainer.method.sample(trainer.ema_network(), z, n, torch.Generator().manual_seed(1), class_labels=labels)
        assert torch.allclose(a, b.clamp(-1, 1), atol=1e-6)
    with pytest.raises(ValueError, match="num_inference_steps must be 1..3"):
        pipe.generate(z, 4, class_labels=labels)


def test_config_errors_name_the_field(tiny_teacher_dir, tmp_path):
    from onestep.training.config import ConfigError

    for bad, field in [({"stage_starts": [5]}, "stage_starts"), ({"stage_starts": [0, 1, 2]}, "stage_starts"),
                       ({"tasks": ["global_cond", "global_cond"]}, "tasks"), ({"heads": 3}, "heads")]:
        with pytest.raises((ConfigError, ValueError), match=field):
            config_from_dict(_recipe(tiny_teacher_dir, tmp_path, **bad))


@pytest.mark.slow  # two accelerate processes: ~40 s alone, minutes on a shared machine
def test_two_processes_train_the_same_heads_and_only_those(tiny_teacher_dir, tmp_path):
    recipe = _recipe(tiny_teacher_dir, tmp_path / "run", steps=3, refresh_fraction=0)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    a, b = run_two_processes(tmp_path / "recipe.yaml", tmp_path / "run", [])
    assert torch.equal(a["drawn"], b["drawn"])          # both ranks drew the same heads at every step
    fresh = Trainer(config_from_dict(_recipe(tiny_teacher_dir, tmp_path / "init"))).method.pool  # same seed: the start
    initial = {k: v.clone() for k, v in fresh.state_dict().items()}
    drawn = set(a["drawn"].flatten().tolist())
    keys = [k for k in a if k.startswith("pool.")]
    assert keys and all(torch.equal(a[k], b[k]) for k in keys)
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("generator."))
    keyed = {fresh.key(*index): i for i, index in enumerate(fresh.index)}
    moved = {keyed[k.split(".")[2]] for k in keys if not torch.equal(a[k], initial[k[len("pool."):]])}
    assert moved == drawn


def test_pool_on_cpu_stays_in_host_memory_and_trains_the_same(tiny_teacher_dir, tmp_path, one_thread):
    trainers = [_trainer(tiny_teacher_dir, tmp_path / str(on_cpu), steps=2, pool_on_cpu=on_cpu)
                for on_cpu in (False, True)]
    for trainer in trainers:
        trainer.train()
    a, b = (t.method.pool.state_dict() for t in trainers)
    assert all(torch.equal(a[k], b[k]) for k in a)   # the drawn heads' copies carry the gradients back
    pool = trainers[1].method.pool
    pool.to("meta")                                   # a move to an accelerator leaves the pool where it is
    assert all(p.device.type == "cpu" for p in pool.parameters())
    trainers[0].method.pool.to("meta")
    assert all(p.device.type == "meta" for p in trainers[0].method.pool.parameters())


def test_step_zero_is_the_initial_one_step_export(tiny_teacher_dir, tiny_export_dir, tmp_path, one_thread):
    """init_from a onestep export with the shift that puts step 1 at its sigma_init (2.5: timestep 440 of the DDPM
    schedule, floor(999 * 441 / 1000) = 440): before training, the 1-step path is that export's generator."""
    from onestep.pipelines import load_pipeline

    recipe = _recipe(tiny_teacher_dir, tmp_path, shift=441)
    recipe["init_from"] = {"generator": tiny_export_dir}
    method = Trainer(config_from_dict(recipe)).method
    export = load_pipeline(tiny_export_dir)
    assert method.gen.sigma_init == pytest.approx(export.config.sigma_init, rel=1e-9)
    z = torch.randn(4, *export.noise_shape, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(4)
    assert torch.allclose(method.sample(method.gen, z, 1, class_labels=labels).clamp(-1, 1),
                          export.generate(z, 1, class_labels=labels), atol=1e-5)
