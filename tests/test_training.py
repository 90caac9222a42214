"""The shared trainer: config validation, full-state resume, checkpoints, non-finite handling, gradient plumbing."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_run_config
from onestep.methods.base import batch_from_data
from onestep.training import checkpoint as ckpt
from onestep.training.config import ConfigError, config_from_dict, load_config
from onestep.training.trainer import Trainer, TrainingStopped, step_generator

UI_FKL_GAN = dict(loss="ui", divergence="fkl", gan_weight=0.01, generator_optimizer={"lr": 1e-4},
                  fake_optimizer={"lr": 1e-4})


# --- config ---------------------------------------------------------------------------------------------------
def test_unknown_key_names_the_key_and_the_valid_ones(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: {name: uni_instruct, divergense: fkl}\ntrain: {stepz: 3}\n")
    with pytest.raises(ConfigError) as err:
        load_config(recipe)
    text = str(err.value)
    assert "method.divergense: unknown key (did you mean 'divergence'?)" in text
    assert "train.stepz: unknown key (did you mean 'steps'?)" in text


def test_bad_values_and_method_names_are_explained(tmp_path):
    with pytest.raises(ConfigError, match=r"method.divergence: .*'rkl'.*'fkl'"):
        config_from_dict({"method": {"name": "uni_instruct", "divergence": "kl2"}})
    with pytest.raises(ConfigError, match=r"train.steps: .*greater than 0 \(got -1\)"):
        config_from_dict({"method": {"name": "uni_instruct"}, "train": {"steps": -1}})
    with pytest.raises(ConfigError, match=r"unknown method 'sdi'; valid: .*uni_instruct"):
        config_from_dict({"method": {"name": "sdi"}})
    with pytest.raises(ConfigError, match="loss 'sid' is the reverse-KL"):
        config_from_dict({"method": {"name": "uni_instruct", "loss": "sid", "divergence": "js"}})
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("method: {name: uni_instruct\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad_yaml)


def test_overrides_apply_to_nested_keys(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: {name: uni_instruct}\n")
    config = load_config(recipe, ["train.steps=7", "method.divergence=js", "method.loss=ui"])
    assert config.train.steps == 7 and config.method.divergence == "js"


# --- resume ---------------------------------------------------------------------------------------------------
def _final_state(out: Path) -> dict:
    last = ckpt.checkpoint_dirs(out / "checkpoints")[-1]
    return {f.name + "/" + k: v for f in sorted(last.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_resume_reproduces_an_uninterrupted_run_exactly(tiny_teacher_dir, tmp_path):
    straight = Trainer(tiny_run_config(tiny_teacher_dir, tmp_path / "a", steps=6, **UI_FKL_GAN))
    straight.train()

    Trainer(tiny_run_config(tiny_teacher_dir, tmp_path / "b", steps=3, **UI_FKL_GAN)).train()
    resumed = Trainer(tiny_run_config(tiny_teacher_dir, tmp_path / "b", steps=6, **UI_FKL_GAN), resume="latest")
    assert resumed.start_step == 3
    resumed.train()

    a, b = _final_state(tmp_path / "a"), _final_state(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) > 50
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) + steps.count(6) - 1  # no duplicated steps


def test_resume_takes_the_recipes_learning_rate_not_the_checkpoints(tiny_teacher_dir, tmp_path, capsys):
    """`--resume latest --set method.generator_optimizer.lr=...` trains on at the new rate (the checkpoint restores
    the optimizer's moments, the recipe its hyper-parameters); it says so."""
    Trainer(tiny_run_config(tiny_teacher_dir, tmp_path, steps=2, loss="dmd")).train()
    config = tiny_run_config(tiny_teacher_dir, tmp_path, steps=3, loss="dmd")
    config.method.generator_optimizer.lr = 3e-6
    resumed = Trainer(config, resume="latest")
    assert "generator learning rate" in capsys.readouterr().out
    resumed.train()
    assert [g["lr"] for g in resumed.optimizers["generator"].param_groups] == [3e-6]
    fake_lr = config.method.fake_optimizer.lr
    assert [g["lr"] for g in resumed.optimizers["fake_score"].param_groups] == [fake_lr]


def test_lr_schedule_is_a_function_of_the_step_so_resume_needs_no_state(tiny_teacher_dir, tmp_path):
    """The schedule (diffusers.optimization's cosine with warm-up) is set from the step at every update: a run
    resumed from its step-2 checkpoint ends with the same weights as the straight run, and the last update used
    lr * cos-decay(step 5 of 6)."""
    config = tiny_run_config(tiny_teacher_dir, tmp_path / "a", steps=6, loss="sid")
    config.train.lr_schedule, config.train.lr_warmup_steps = "cosine", 2
    straight = Trainer(config)
    straight.train()
    base = config.method.generator_optimizer.lr
    expected = base * 0.5 * (1 + math.cos(math.pi * (5 - 2) / (6 - 2)))
    assert straight.optimizers["generator"].param_groups[0]["lr"] == pytest.approx(expected, rel=1e-6)

    copy_dir = tmp_path / "b"
    shutil.copytree(tmp_path / "a", copy_dir)
    for later in sorted((copy_dir / "checkpoints").glob("step_*"))[1:]:  # keep only the step-2 checkpoint
        shutil.rmtree(later)
    config_b = config.model_copy(update={"output_dir": str(copy_dir)})
    resumed = Trainer(config_b, resume="latest")
    assert resumed.start_step == 2
    resumed.train()
    a, b = _final_state(tmp_path / "a"), _final_state(copy_dir)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_fresh_run_sets_an_earlier_runs_results_aside(tiny_teacher_dir, tmp_path):
    Trainer(tiny_run_config(tiny_teacher_dir, tmp_path, steps=6, loss="sid")).train()  # checkpoints 2, 4, 6
    first = {str(p.relative_to(tmp_path)): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    Trainer(tiny_run_config(tiny_teacher_dir, tmp_path, steps=2, loss="sid")).train()  # a new run, same folder
    (aside,) = tmp_path.glob("earlier_*")
    assert {str(p.relative_to(aside)): p.read_bytes() for p in aside.rglob("*") if p.is_file()} == first
    assert len(list((aside / "checkpoints").glob("step_*"))) == 3
    assert len(list((tmp_path / "checkpoints").glob("step_*"))) == 1
    assert (tmp_path / "pipeline").is_dir() and (tmp_path / "metrics.jsonl").is_file()  # the new run's
    resumed = Trainer(tiny_run_config(tiny_teacher_dir, tmp_path, steps=4, loss="sid"), resume="latest")
    assert resumed.start_step == 2  # the new run's checkpoint, not the old step 6


def test_checkpoints_are_atomic_and_retained(tmp_path):
    module = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(module.parameters())
    module(torch.ones(1, 2)).sum().backward()
    opt.step()
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        ckpt.save_checkpoint(root, step, {"net": module}, {"net": opt}, {"method": "x"}, keep=2)
    (root / ".tmp_step_0000009_123").mkdir()           # a save killed half-way
    (root / "step_0000010").mkdir()                     # a folder without its state file is not a checkpoint
    assert [p.name for p in ckpt.checkpoint_dirs(root)] == ["step_0000002", "step_0000003"]
    assert ckpt.resolve_checkpoint(root, "latest").name == "step_0000003"
    fresh, fresh_opt = torch.nn.Linear(2, 2), torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    state = ckpt.load_checkpoint(root / "step_0000003", {"net": fresh}, {"net": fresh_opt})
    assert state["step"] == 3
    assert torch.equal(fresh.weight, module.weight)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    module = torch.nn.Linear(2, 2)
    with torch.no_grad():
        module.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        ckpt.save_checkpoint(tmp_path, 1, {"net": module}, {}, {}, keep=1)
    assert ckpt.checkpoint_dirs(tmp_path) == [] and not list(tmp_path.glob(".tmp*"))


# --- non-finite updates -----------------------------------------------------------------------------------------
def _times_nan(loss_and_logs):
    loss, logs = loss_and_logs
    return loss * float("nan"), logs


def _poisoned_trainer(tiny_teacher_dir, out, policy):
    config = tiny_run_config(tiny_teacher_dir, out, steps=3, loss="sid")
    config.train.nan_policy = policy
    trainer = Trainer(config)
    step = trainer.method.generator_step

    def poisoned(batch, ctx):  # a NaN appears in the generator's loss at every step
        original = ctx.update
        ctx.update = lambda name, loss_fn, batch: original(name, lambda b: _times_nan(loss_fn(b)), batch)
        return step(batch, ctx)

    trainer.method.generator_step = poisoned
    return trainer


def test_nan_updates_are_skipped_and_weights_stay_finite(tiny_teacher_dir, tmp_path):
    trainer = _poisoned_trainer(tiny_teacher_dir, tmp_path, "skip")
    before = {k: v.clone() for k, v in trainer.method.gen.state_dict().items()}
    result = trainer.train()
    assert result["skipped_updates"] == 3
    after = trainer.method.gen.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # generator never stepped on a NaN


def test_nan_policy_stop_raises_a_clear_error(tiny_teacher_dir, tmp_path):
    with pytest.raises(TrainingStopped, match="non-finite generator loss or gradient"):
        _poisoned_trainer(tiny_teacher_dir, tmp_path, "stop").train()


# --- gradient plumbing (frozen networks, gradients through their inputs) -------------------------------------------
class RecordingContext:
    """A StepContext that runs backward and keeps the gradients instead of stepping an optimizer."""

    def __init__(self, method, step=10_000):
        self.method, self.step, self.rng = method, step, torch.Generator().manual_seed(0)
        self.grads = {}

    def net(self, name):
        return dict((n, m) for n, (m, _) in self.method.trainable().items())[name]

    def update(self, name, loss_fn, batch):
        loss, logs = loss_fn(batch)
        loss.backward()
        modules = {"teacher": self.method.denoiser, **{n: m for n, (m, _) in self.method.trainable().items()}}
        self.grads[name] = {n: [p.grad.clone() if p.grad is not None else None for p in m.parameters()]
                            for n, m in modules.items()}
        for m in modules.values():
            m.zero_grad(set_to_none=True)
        return logs

    def mean_across_processes(self, value):
        return value


def _perturb(module, scale=0.05):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def _method(tiny_teacher_dir, **method):
    config = tiny_run_config(tiny_teacher_dir, "unused", **method)
    from onestep.data import load_dataset
    from onestep.denoisers import load_teacher
    from onestep.methods.uni_instruct import UniInstruct
    from onestep.teachers import DiffusionTeacher

    data = load_dataset("digits", 8)
    data.cond = {"class_labels": data.labels}
    m = UniInstruct(config.method, DiffusionTeacher(tiny_teacher_dir, denoiser=load_teacher(tiny_teacher_dir)), data)
    return m, batch_from_data(data, torch.arange(6))


@pytest.mark.parametrize("method", [dict(loss="sid", alpha=1.2), dict(loss="dmd"), dict(loss="ui", divergence="js"),
                                    dict(loss="ui", divergence="pearson"), dict(loss="dmd", divergence="fkl")])
def test_generator_gradient_is_zero_when_fake_score_equals_teacher(tiny_teacher_dir, method):
    m, batch = _method(tiny_teacher_dir, **method)
    torch.nn.init.normal_(m.fake.denoiser.model.conv_out.weight)        # make sure this test could fail ...
    m.fake.denoiser.model.load_state_dict(m.denoiser.model.state_dict())  # ... then fake == teacher
    ctx = RecordingContext(m)
    m.generator_step(batch, ctx)
    grads = [g for g in ctx.grads["generator"]["generator"] if g is not None]
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("loss", ["sid", "dmd"])
def test_gradients_reach_only_the_network_being_updated(tiny_teacher_dir, loss):
    m, batch = _method(tiny_teacher_dir, loss=loss)
    _perturb(m.fake)  # fake != teacher, else the generator gradient is exactly 0
    ctx = RecordingContext(m)
    m.step(batch, ctx)
    fake_step, gen_step = ctx.grads["fake_score"], ctx.grads["generator"]
    assert all(g is None for g in fake_step["teacher"] + gen_step["teacher"])       # the teacher never learns
    assert all(g is None for g in fake_step["generator"])                           # G is detached in (A)
    assert all(g is None for g in gen_step["fake_score"])                           # D_q is frozen in (B)
    assert any(g is not None and g.abs().sum() > 0 for g in gen_step["generator"])


def test_sid_gradient_flows_through_the_teacher_input_dmd_does_not(tiny_teacher_dir):
    """Detaching D_p's output changes SiD's gradient (input path active) but not DMD's (direction is detached)."""
    def generator_grads(loss, detach_teacher):
        m, batch = _method(tiny_teacher_dir, loss=loss)
        torch.manual_seed(0)
        _perturb(m.fake)
        if detach_teacher:
            teacher_forward = m.denoiser.forward
            m.denoiser.forward = lambda *a, **k: teacher_forward(*a, **k).detach()
        ctx = RecordingContext(m)
        m.generator_step(batch, ctx)
        return torch.cat([g.flatten() for g in ctx.grads["generator"]["generator"] if g is not None])

    assert not torch.allclose(generator_grads("sid", False), generator_grads("sid", True))
    torch.testing.assert_close(generator_grads("dmd", False), generator_grads("dmd", True))


def test_step_randomness_is_a_function_of_seed_step_and_rank():
    a = torch.randn(4, generator=step_generator(0, 5, 0, "cpu"))
    assert torch.equal(a, torch.randn(4, generator=step_generator(0, 5, 0, "cpu")))
    assert not torch.equal(a, torch.randn(4, generator=step_generator(0, 5, 1, "cpu")))
    assert not torch.equal(a, torch.randn(4, generator=step_generator(0, 6, 0, "cpu")))


def test_gradient_accumulation_gives_the_full_batch_gradient(tiny_teacher_dir, tmp_path):
    """Two micro-batches of 2 rows give the gradient of the batch of 4 (row-weighted), and one optimizer step."""
    from onestep.methods.base import Batch

    trainer = Trainer(tiny_run_config(tiny_teacher_dir, tmp_path, steps=1))
    module = trainer.modules["generator"]
    x = torch.randn(4, 3)

    def loss_fn(b):
        out = module.denoiser.model.conv_in.weight.sum() * b.x.sum(1)
        return out.pow(2).mean(), {"loss/x": float(b.x.mean())}

    batch = Batch(x=x, size=4)
    expected = torch.autograd.grad(loss_fn(batch)[0], module.denoiser.model.conv_in.weight)[0]
    grads = []
    trainer.optimizers["generator"].step = lambda: grads.append(module.denoiser.model.conv_in.weight.grad.clone())
    trainer.config.train.gradient_accumulation_steps = 2
    logs = trainer.apply_update("generator", loss_fn, batch, 0)
    assert len(grads) == 1
    torch.testing.assert_close(grads[0], expected)
    assert logs["loss/x"] == pytest.approx(float(x.mean()))


def test_channels_last_keeps_every_network_nhwc_and_exports_a_contiguous_pipeline(tiny_teacher_dir, tmp_path):
    """train.channels_last: the teacher's, generator's and fake score's conv weights are NHWC while training (the
    faster oneDNN path, bench/quickstart_speed.py); the export is written contiguous (safetensors) and samples
    exactly as the trained EMA network."""
    from onestep.pipelines import load_pipeline

    config = tiny_run_config(tiny_teacher_dir, tmp_path / "run", steps=2, loss="dmd")
    config.train.channels_last = True
    trainer = Trainer(config)

    def conv_weights(module):
        return [m.weight for m in module.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[1] > 1
                and m.kernel_size != (1, 1)]

    for module in (trainer.method.denoiser, trainer.modules["generator"], trainer.modules["fake_score"]):
        weights = conv_weights(module)
        assert weights and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
                               for w in weights)
    trainer.train()
    noise, labels = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(4)
    with torch.no_grad():
        expected = trainer.method.sample(trainer.ema_network(), noise, class_labels=labels)
        exported = load_pipeline(tmp_path / "run" / "pipeline").generate(noise, class_labels=labels)
    torch.testing.assert_close(exported, expected.clamp(-1, 1), rtol=1e-5, atol=1e-5)  # the pipeline clamps
