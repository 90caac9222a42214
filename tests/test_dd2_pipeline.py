"""DD2's exports in plain diffusers and the demo. A DD2 folder carries the two self-contained files of its one
implementation: `pipeline.py` (onestep/pipelines/standalone_pipeline.py, `DD2Pipeline`) and `generator/ar_diffusion.py`
(onestep/pipelines/standalone_ar_diffusion.py, `ARDiffusionModel`). These tests check that plain diffusers, in a fresh
interpreter where onestep cannot be imported, loads the shipped assets/pipelines/digits16_dd2 and a dummy export and
gives onestep's images bit for bit (1-3 steps, pixels and token embeddings), and reloads a folder it saved itself;
that onestep never runs the folder's copies; that older folders (generator ["onestep.ar_diffusion", ...]) still
load; and that `onestep demo` serves the shipped DD2 folder."""
import ast
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_without_onestep
from onestep.pipelines import DD2Pipeline, load_pipeline, standalone_ar_diffusion, standalone_pipeline
from onestep.resources import ASSETS

SHIPPED = ASSETS / "pipelines" / "digits16_dd2"
LABELS = [3, 1, 4, 1, 5, 9]
OUTPUTS = [(1, "pt"), (2, "pt"), (3, "pt"), (2, "latent")]

# Plain diffusers with onestep hidden (conftest.run_without_onestep); sys.argv[1] is the JSON list of cases
FRESH_PROCESS = r'''

def run(pipe, steps, output_type):
    return pipe(class_labels=case["labels"], num_inference_steps=steps, generator=torch.Generator().manual_seed(5),
                output_type=output_type).images

for case in json.loads(sys.argv[1]):
    pipe = diffusers.DiffusionPipeline.from_pretrained(case["dir"], trust_remote_code=True)
    assert type(pipe).__name__ == "DD2Pipeline" and not type(pipe).__module__.startswith("onestep"), type(pipe)
    assert type(pipe.generator).__name__ == "ARDiffusionModel", type(pipe.generator)
    assert not type(pipe.generator).__module__.startswith("onestep"), type(pipe.generator).__module__
    got = {f"{s}_{o}": run(pipe, s, o) for s, o in case["outputs"]}
    pipe.save_pretrained(case["resave"])  # a folder saved by plain diffusers loads again, as the same pipeline
    again = diffusers.DiffusionPipeline.from_pretrained(case["resave"], trust_remote_code=True)
    for s, o in case["outputs"]:
        assert torch.equal(run(again, s, o), got[f"{s}_{o}"]), (case["dir"], s, o)
    torch.save(got, case["out"])
    print(case["name"], pipe.card.get("method"))
assert not any(name.partition(".")[0] == "onestep" for name in sys.modules)
'''


def _images(pipe, steps: int, output_type: str) -> torch.Tensor:
    return pipe(class_labels=LABELS, num_inference_steps=steps, generator=torch.Generator().manual_seed(5),
                output_type=output_type).images


def _dummy_export(path: Path) -> DD2Pipeline:
    pipe = DD2Pipeline(**DD2Pipeline.dummy_components())
    pipe.card = {"teacher": "tiny-ar", "method": "test"}
    pipe.save_pretrained(path)
    return pipe


def test_plain_diffusers_without_onestep_gives_onesteps_images(tmp_path, one_thread):
    cases, expected = [], {}
    _dummy_export(tmp_path / "dummy")
    for name, folder in (("dummy", tmp_path / "dummy"), ("digits16_dd2", SHIPPED)):
        pipe = load_pipeline(folder)
        pipe.set_progress_bar_config(disable=True)
        expected[name] = {f"{s}_{o}": _images(pipe, s, o) for s, o in OUTPUTS}
        cases.append({"name": name, "dir": str(folder), "outputs": OUTPUTS, "labels": LABELS,
                      "resave": str(tmp_path / f"{name}_resaved"), "out": str(tmp_path / f"got_{name}.pt")})
    run = run_without_onestep(FRESH_PROCESS, cases, tmp_path)
    assert "digits16_dd2 DD2 (conditional score distillation, one step)" in run.stdout and "dummy test" in run.stdout
    for case in cases:
        got = torch.load(case["out"], weights_only=True)
        for key, want in expected[case["name"]].items():
            assert got[key].shape == want.shape and torch.equal(got[key], want), \
                f"{case['name']} {key}: max |diff| {(got[key] - want).abs().max():.3g}"
    assert expected["digits16_dd2"]["1_pt"].shape == (6, 1, 16, 16)
    assert not torch.equal(expected["digits16_dd2"]["1_pt"], expected["digits16_dd2"]["3_pt"])  # refinement acts
    for name in ("dummy", "digits16_dd2"):  # onestep loads what plain diffusers saved, with the same images
        resaved = load_pipeline(tmp_path / f"{name}_resaved")
        assert type(resaved) is DD2Pipeline
        assert torch.equal(_images(resaved, 2, "pt"), expected[name]["2_pt"])


def test_exports_carry_the_modules_verbatim_and_need_only_torch_diffusers_transformers(tmp_path):
    _dummy_export(tmp_path)
    pipeline_code = Path(standalone_pipeline.__file__).read_text()
    network_code = Path(standalone_ar_diffusion.__file__).read_text()
    for folder in (tmp_path, SHIPPED):  # the shipped copies are today's modules (regenerate them when these change)
        assert (folder / "pipeline.py").read_text() == pipeline_code, folder
        assert (folder / "generator" / "ar_diffusion.py").read_text() == network_code, folder
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == ["pipeline", "DD2Pipeline"]
        assert index["generator"] == ["ar_diffusion", "ARDiffusionModel"] and index["vq"] == ["diffusers", "VQModel"]
    imported = set()
    for node in ast.walk(ast.parse(network_code)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.partition(".")[0])
    assert imported <= {"__future__", "math", "torch", "diffusers", "transformers"}, imported


def test_onestep_never_runs_the_folders_code_and_loads_older_folders(tmp_path):
    """load_pipeline imports onestep's own copy of the network file (a tampered copy in the folder is not run), and a
    folder exported before the standalone files (generator ["onestep.ar_diffusion", ...], _class_name a plain name,
    no .py files) loads with the same images."""
    pipe = _dummy_export(tmp_path / "export")
    pipe.set_progress_bar_config(disable=True)
    want = _images(pipe, 3, "pt")
    for path in ("pipeline.py", "generator/ar_diffusion.py"):
        (tmp_path / "export" / path).write_text("raise SystemExit('folder code ran')\n")
    tampered = load_pipeline(tmp_path / "export")
    assert type(tampered.generator) is standalone_ar_diffusion.ARDiffusionModel
    assert torch.equal(_images(tampered, 3, "pt"), want)

    old = tmp_path / "old"
    shutil.copytree(tmp_path / "export", old)
    for path in ("pipeline.py", "generator/ar_diffusion.py"):
        (old / path).unlink()
    index = json.loads((old / "model_index.json").read_text())
    index.update(_class_name="DD2Pipeline", generator=["onestep.ar_diffusion", "ARDiffusionModel"])
    (old / "model_index.json").write_text(json.dumps(index))
    assert torch.equal(_images(load_pipeline(old), 3, "pt"), want)
    index["generator"] = ["ar_diffusion_evil", "ARDiffusionModel"]  # any other custom module is still refused
    (old / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="is not from"):
        load_pipeline(old)


def test_onestep_demo_serves_the_shipped_dd2_folder(monkeypatch, capsys):
    """`onestep demo assets/pipelines/digits16_dd2` builds the app (launch replaced: no server), and a Generate
    request returns the pipeline's own images for that seed and class."""
    gr = pytest.importorskip("gradio")
    from onestep.cli import main

    launched = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: launched.append((self, kwargs)))
    assert main(["demo", str(SHIPPED), "--port", "7999"]) == 0
    assert len(launched) == 1 and launched[0][1]["server_port"] == 7999
    assert "digits16_dd2 loaded" in capsys.readouterr().out

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "demo"))
    try:
        import app as demo_app
    finally:
        sys.path.pop(0)
    demo = demo_app.Demo(SHIPPED)
    assert (demo.caps.num_classes, demo.caps.max_steps, demo.caps.hal_filter, demo.caps.prompt) == (10, 3, False, False)
    with demo_app.gr.Blocks():
        assert list(demo_app._controls(demo.caps, 16)) == ["class_label", "seed", "num_images", "steps"]
    result = demo.generate(demo_app.Request.parse({"seed": 4, "num_images": 3, "steps": 2, "class_label": "7"},
                                                  demo.caps))
    expected = demo.pipe(batch_size=3, num_inference_steps=2, class_labels=[7, 7, 7],
                         generator=torch.Generator().manual_seed(4)).images
    assert [caption for _, caption in result.images] == ["7", "7", "7"]
    assert [image.size for image, _ in result.images] == [(16, 16)] * 3
    assert all(got.tobytes() == want.tobytes() for (got, _), want in zip(result.images, expected))
    assert "2 step(s)" in result.latency and "**NFE**: 1" in demo.card_markdown()
