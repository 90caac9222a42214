"""The registry and the protocol from the consumers' side: `onestep sample`, `onestep fid` and the demo work on a
registered pipeline class other than OneStepPipeline (the test-only FlipPipeline), through `load_pipeline` only."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flip_pipeline import FlipPipeline, flip_registered  # noqa: F401  (fixture)
from onestep.cli import main
from onestep.pipelines import OneStepPipeline, available_pipelines, load_pipeline, register_pipeline
from tiny_teachers import text_export

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "demo"))
import app as demo_app  # noqa: E402


@pytest.fixture
def twins(tmp_path, flip_registered):  # noqa: F811
    """The same tiny weights exported as a OneStepPipeline and as a FlipPipeline."""
    components = OneStepPipeline.dummy_components()
    OneStepPipeline(**components).save_pretrained(tmp_path / "onestep")
    FlipPipeline(**components).save_pretrained(tmp_path / "flip")
    return tmp_path / "onestep", tmp_path / "flip"


def test_load_pipeline_dispatches_on_the_saved_class_and_refuses_others(twins, tiny_teacher_dir, tmp_path):
    plain, flip = twins
    assert set(available_pipelines()) >= {"OneStepPipeline", "FlipPipeline"}
    assert type(load_pipeline(plain)) is OneStepPipeline and type(load_pipeline(flip)) is FlipPipeline
    index = json.loads((flip / "model_index.json").read_text())
    assert index["_class_name"] == "FlipPipeline" and not (flip / "pipeline.py").exists()  # no plain-diffusers claim
    from onestep.pipelines import TeacherPipeline

    assert type(load_pipeline(tiny_teacher_dir)) is TeacherPipeline  # a diffusers teacher folder (DDPMPipeline)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "AudioLDMPipeline"}))
    with pytest.raises(ValueError, match=r"a AudioLDMPipeline folder, not a registered onestep pipeline \((\w+, )*"
                                         r"FlipPipeline, (\w+, )*OneStepPipeline"):  # every registered class, sorted
        load_pipeline(tmp_path)
    with pytest.raises(TypeError, match="not a GeneratorPipeline subclass"):
        register_pipeline(dict)


def test_onestep_sample_on_another_class(twins, tmp_path, capsys):
    plain, flip = twins
    for source in twins:
        assert main(["sample", str(source), "-n", "5", "--batch-size", "4", "--steps", "2", "--seed", "3",
                     "--out", str(tmp_path / f"png_{source.name}")]) == 0
    for i in range(5):
        a = np.asarray(Image.open(tmp_path / "png_onestep" / f"{i:06d}.png"))
        b = np.asarray(Image.open(tmp_path / "png_flip" / f"{i:06d}.png"))
        assert np.array_equal(b, a[:, ::-1]) and a.std() > 0  # the flip class's own images, sample for sample
    assert main(["sample", str(flip), "-n", "4", "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").is_file()
    capsys.readouterr()
    assert main(["sample", str(flip), "-n", "4", "--out", str(tmp_path / "f.png"), "--filter", "keep"]) == 2
    err = capsys.readouterr().err.strip()
    assert "FlipPipeline does not support the hallucination filter" in err and "\n" not in err
    assert main(["sample", str(flip), "-n", "4", "--out", str(tmp_path / "g.png"), "--steps", "5"]) == 2
    assert "--steps must be 1..4" in capsys.readouterr().err


def test_onestep_fid_on_another_class(twins, tmp_path, capsys):
    """FID of the flip class sampled on the fly = FID of the PNGs `onestep sample` wrote from it (index sampling)."""
    _, flip = twins
    assert main(["sample", str(flip), "-n", "12", "--batch-size", "4", "--seed", "1",
                 "--out", str(tmp_path / "p")]) == 0
    common = ["onestep:digits", "--resolution", "8", "--no-cache", "--batch-size", "4", "--json", "--no-progress"]
    results = []
    for source, extra in ((flip, ["-n", "12", "--seed", "1", "--sampling", "index"]), (tmp_path / "p", [])):
        capsys.readouterr()
        assert main(["fid", str(source), *common, *extra]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0]["fid"] == results[1]["fid"] > 0
    assert results[0]["protocol"]["nfe"] == 1 and "pipeline" in results[0]["protocol"]["input1"]


def test_demo_serves_a_latent_text_export(tmp_path):
    """A prompt box (takes_prompt), pixels decoded by the VAE, the pipeline's own images for the same seed."""
    text_export(tmp_path, tmp_path / "text")
    demo = demo_app.Demo(tmp_path / "text")
    assert demo.caps.prompt and demo.caps.num_classes is None and demo.caps.hal_filter
    with demo_app.gr.Blocks():
        assert list(demo_app._controls(demo.caps, 16))[0] == "prompt"
    result = demo.generate(demo_app.Request.parse({"seed": 2, "num_images": 2, "prompt": " a red circle "},
                                                  demo.caps))
    expected = demo.pipe("a red circle", num_images_per_prompt=2, generator=torch.Generator().manual_seed(2)).images
    assert [image.size for image, _ in result.images] == [(16, 16)] * 2
    assert all(got.tobytes() == want.tobytes() for (got, _), want in zip(result.images, expected))


def test_demo_generate_path_on_another_class(twins):
    plain, flip = twins
    demo = demo_app.Demo(flip)
    caps = demo.caps
    assert (caps.num_classes, caps.max_steps, caps.prompt, caps.hal_filter) == (10, 4, False, False)
    assert caps.extra_inputs == {"contrast": "float"}
    with demo_app.gr.Blocks():
        assert list(demo_app._controls(caps, 16)) == ["class_label", "seed", "num_images", "steps", "contrast"]
    req = demo_app.Request.parse({"seed": 4, "num_images": 3, "steps": 2, "class_label": "7", "contrast": "0.5"}, caps)
    result = demo.generate(req)
    expected = load_pipeline(flip)(batch_size=3, num_inference_steps=2, generator=torch.Generator().manual_seed(4),
                                   class_labels=[7, 7, 7], contrast=0.5).images
    assert [caption for _, caption in result.images] == ["7", "7", "7"]
    assert all(got.tobytes() == want.tobytes() for (got, _), want in zip(result.images, expected))
    for values, message in [({"contrast": "abc"}, "contrast must be a number"),
                            ({"contrast": "inf"}, "contrast must be a finite number"),
                            ({"hal_filter": True, "contrast": 1}, "does not support the hallucination filter")]:
        with pytest.raises(ValueError, match=message):
            demo_app.Request.parse({"seed": 0, "num_images": 2, **values}, caps)
