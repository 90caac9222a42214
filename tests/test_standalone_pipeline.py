"""The exported `pipeline.py` (onestep/pipelines/standalone_pipeline.py) is the one implementation of OneStepPipeline's
generation: onestep's registered class subclasses it. These tests check (1) that it equals onestep's training-side
maths (Denoiser, LatentSpace, PromptEncoder) for every scheduler family and for pixel, latent and text exports, and
(2) that plain diffusers, in a fresh interpreter where onestep cannot be imported, loads and runs a pixel, a latent and
a text export and the shipped assets/pipelines/digits16 with the same images, without config warnings, and reloads a
folder it saved itself."""
import ast
import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, EDMEulerScheduler, FlowMatchEulerDiscreteScheduler

from conftest import run_without_onestep, tiny_unet
from tiny_teachers import latent_export, text_export
from onestep.denoisers import MLPModel, denoiser_from_pretrained
from onestep.generators import OneStepGenerator
from onestep.pipelines import OneStepPipeline, load_pipeline, standalone_pipeline
from onestep.resources import ASSETS

SCHEDULERS = {
    "epsilon": lambda: DDPMScheduler(beta_schedule="linear", prediction_type="epsilon"),
    "v_prediction": lambda: DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                          prediction_type="v_prediction"),
    "flow": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
    "edm": lambda: EDMEulerScheduler(sigma_data=0.5),
}
OUTPUTS = [(1, "raw"), (4, "raw"), (2, "pt")]
PROMPTS = ["a red circle", "a blue square", "a red circle"]

# Plain diffusers with onestep hidden (conftest.run_without_onestep). diffusers' own warnings (e.g. "config attributes
# ... are not expected") go to stderr, which the test reads.
FRESH_PROCESS = r'''

def run(pipe, case, steps, output_type):
    prompt = case.get("prompts")
    kwargs = {"prompt": prompt} if prompt else {"batch_size": 3}
    return pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(5), output_type=output_type,
                **kwargs).images

for case in json.loads(sys.argv[1]):
    route = {"custom_pipeline": case["dir"]} if case.get("custom_pipeline") else {}
    pipe = diffusers.DiffusionPipeline.from_pretrained(case["dir"], trust_remote_code=True, **route)
    assert type(pipe).__name__ == "OneStepPipeline" and not type(pipe).__module__.startswith("onestep"), type(pipe)
    got = {f"{s}_{o}": run(pipe, case, s, o) for s, o in case["outputs"]}
    if case.get("resave"):  # a folder saved by the plain-diffusers pipeline loads again, as the same pipeline
        pipe.save_pretrained(case["resave"])
        again = diffusers.DiffusionPipeline.from_pretrained(case["resave"], trust_remote_code=True)
        for s, o in case["outputs"]:
            assert torch.equal(run(again, case, s, o), got[f"{s}_{o}"]), (case["name"], s, o)
    torch.save(got, f"{case['out']}")
    print(case["name"], pipe.card.get("teacher"))
assert not any(name.partition(".")[0] == "onestep" for name in sys.modules)
'''


def _export(scheduler, path: Path | None = None, model=None) -> OneStepPipeline:
    denoiser = denoiser_from_pretrained(model or tiny_unet(), scheduler)
    pipe = OneStepPipeline.from_generator(OneStepGenerator(denoiser, 2.5), denoiser.scheduler,
                                          {"teacher": "tiny", "method": "test"})
    if path is not None:
        pipe.save_pretrained(path)
    return pipe


def _images(pipe, steps: int, output_type: str, prompts=None) -> torch.Tensor:
    kwargs = {"prompt": prompts} if prompts else {"batch_size": 3}
    return pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(5), output_type=output_type,
                **kwargs).images


def test_generation_equals_onestep_training_maths(tmp_path):
    """One step of each export = the package's OneStepGenerator (Denoiser) on the same noise, with PromptEncoder's
    text embeddings and LatentSpace's decoding: the standalone file and onestep's training maths agree."""
    from onestep.conditioning import PromptEncoder
    from onestep.latents import LatentSpace

    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for pipe, cond in ((latent_export(), {}), (text_export(tmp_path), None)):
        if cond is None:
            cond = PromptEncoder.from_components("StableDiffusionPipeline", pipe.components)(PROMPTS)[0]
        generator = OneStepGenerator(denoiser_from_pretrained(pipe.unet, pipe.scheduler), pipe.config.sigma_init)
        with torch.no_grad():
            expected = LatentSpace(pipe.vae).decode(generator(z, **cond))
        got = pipe.generate(z, 1, prompts=PROMPTS if pipe.takes_prompt else None)
        assert got.shape == (3, 3, 16, 16) and torch.equal(got, expected)


def test_plain_diffusers_without_onestep_gives_identical_images(tmp_path, one_thread):  # as the child process
    """Pixel exports of all four scheduler families, a latent and a text export, and the shipped digits16: plain
    diffusers gives onestep's images bit for bit, warns about no config attribute, and reloads its own save."""
    cases, expected = [], {}
    for i, (name, scheduler) in enumerate(SCHEDULERS.items()):
        pipe = _export(scheduler(), tmp_path / name)
        expected[name] = {f"{s}_{o}": _images(pipe, s, o) for s, o in OUTPUTS}
        cases.append({"name": name, "dir": str(tmp_path / name), "outputs": OUTPUTS, "custom_pipeline": i % 2 == 1})
    latent_export(tmp_path / "latent")  # onestep's side loads the folder too (modules in eval mode, as diffusers')
    expected["latent"] = {f"{s}_{o}": _images(load_pipeline(tmp_path / "latent"), s, o) for s, o in OUTPUTS}
    cases.append({"name": "latent", "dir": str(tmp_path / "latent"), "outputs": OUTPUTS,
                  "resave": str(tmp_path / "latent_resaved")})
    text_export(tmp_path, tmp_path / "text")
    text = load_pipeline(tmp_path / "text")
    expected["text"] = {f"{s}_{o}": _images(text, s, o, PROMPTS) for s, o in OUTPUTS}
    cases.append({"name": "text", "dir": str(tmp_path / "text"), "outputs": OUTPUTS, "prompts": PROMPTS,
                  "resave": str(tmp_path / "text_resaved")})
    digits = load_pipeline(ASSETS / "pipelines" / "digits16")
    expected["digits16"] = {f"{s}_{o}": _images(digits, s, o) for s, o in [(1, "pt"), (3, "pt")]}
    cases.append({"name": "digits16", "dir": str(ASSETS / "pipelines" / "digits16"),
                  "outputs": [(1, "pt"), (3, "pt")], "resave": str(tmp_path / "digits16_resaved")})
    for case in cases:
        case["out"] = str(tmp_path / f"got_{case['name']}.pt")
    run = run_without_onestep(FRESH_PROCESS, cases, tmp_path)
    for case in cases:
        got = torch.load(case["out"], weights_only=True)
        for key, want in expected[case["name"]].items():
            assert torch.equal(got[key], want), f"{case['name']} {key}: max |diff| {(got[key] - want).abs().max():.3g}"
    assert "digits16 assets/teachers/digits16" in run.stdout and "text tiny-sd" in run.stdout
    for name in ("latent", "text", "digits16"):  # onestep loads what plain diffusers saved, with the same images
        resaved = load_pipeline(tmp_path / f"{name}_resaved")
        key, want = next(iter(expected[name].items()))
        steps, output_type = key.split("_")
        assert torch.equal(_images(resaved, int(steps), output_type, PROMPTS if name == "text" else None), want)


def test_shipped_pipeline_file_is_the_current_standalone_module():
    """assets/pipelines/digits16/pipeline.py is regenerated whenever the module changes (plain-diffusers users of
    the shipped folder run today's code; test_plain_diffusers_... checks its images)."""
    shipped = (ASSETS / "pipelines" / "digits16" / "pipeline.py").read_text()
    assert shipped == Path(standalone_pipeline.__file__).read_text()


def test_points_generator_through_the_standalone_class(tmp_path):
    """Non-image generators (MLPModel: its class is onestep's, so the export claims no plain-diffusers support and
    writes no pipeline.py; the standalone class still runs it where onestep is installed)."""
    pipe = _export(EDMEulerScheduler(sigma_data=0.5), tmp_path, MLPModel(dim=2, hidden=16, depth=2))
    assert not (tmp_path / "pipeline.py").exists()
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "OneStepPipeline"
    standalone = standalone_pipeline.OneStepPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    for steps in (1, 3):
        got = _images(standalone, steps, "raw")
        assert got.shape == (3, 2) and torch.equal(got, _images(pipe, steps, "raw"))
    assert standalone.card["method"] == "test" and type(load_pipeline(tmp_path)) is OneStepPipeline


def test_exported_file_is_the_module_verbatim_and_needs_only_torch_and_diffusers(tmp_path):
    _export(SCHEDULERS["epsilon"](), tmp_path)
    source = Path(standalone_pipeline.__file__).read_text()
    assert (tmp_path / "pipeline.py").read_text() == source
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == ["pipeline", "OneStepPipeline"]
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.partition(".")[0])
    assert imported <= {"inspect", "json", "math", "pathlib", "typing", "torch", "diffusers"}, imported


def test_sampling_config_lives_in_model_index_and_the_card_states_the_nfe(tmp_path):
    """The few-step grid (rule or explicit list) and the time shift are pipeline config, saved in model_index.json;
    the card's NFE is the default number of steps; defaults reproduce the rule geometric to 8% of sigma_init."""
    pipe = _export(SCHEDULERS["flow"]())
    s0 = pipe.sigmas(1)[0]
    assert pipe.sigmas(3) == pytest.approx([s0, s0 * 0.08 ** 0.5, s0 * 0.08])
    explicit = OneStepPipeline(**pipe.components, sigma_init=2.5, renoise_sigmas=[1.0, 0.25], timestep_shift=3.0,
                               default_inference_steps=3)
    t = [s / (1 + s) for s in (1.0, 0.25)]
    shifted = [3 * u / (1 + 2 * u) for u in t]
    assert explicit.max_inference_steps == 3 and explicit.sigmas(3)[1:] == pytest.approx([u / (1 - u) for u in shifted])
    explicit.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["renoise_sigmas"] == [1.0, 0.25] and index["timestep_shift"] == 3.0
    assert json.loads((tmp_path / "onestep_card.json").read_text())["nfe"] == 3
    loaded = load_pipeline(tmp_path)
    assert loaded.default_inference_steps == 3 and loaded.sigmas(3) == explicit.sigmas(3)
    assert torch.equal(_images(loaded, 3, "raw"), _images(explicit, 3, "raw"))
    assert not torch.equal(_images(loaded, 2, "raw"), _images(pipe, 2, "raw"))
    # a level above the teacher's range was clamped silently at generation: refused when the pipeline is built
    for bad, message in [({"sigma_init": float("nan")}, r"sigma_init must be a finite noise level in \(0, "),
                         ({"sigma_init": 1e6}, r"in \(0, [\d.]+\] \(the teacher's range\), got 1000000\.0"),
                         ({"renoise_sigmas": [1.0, float("inf")]}, r"renoise_sigmas\[1\] must be a finite number"),
                         ({"timestep_shift": 0}, "timestep_shift must be a finite number"),
                         ({"default_inference_steps": 5}, "default_inference_steps must be a whole number in 1..4")]:
        with pytest.raises(ValueError, match=message):
            OneStepPipeline(**pipe.components, **bad)


def test_standalone_validates_steps(tmp_path):
    _export(SCHEDULERS["flow"](), tmp_path)
    with pytest.raises(ValueError, match="num_inference_steps must be 1..4"):
        standalone_pipeline.OneStepPipeline.from_pretrained(tmp_path, trust_remote_code=True)(num_inference_steps=0)
