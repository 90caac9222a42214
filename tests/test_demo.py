"""The Gradio demo (demo/app.py) through its API with gradio_client, offline on loopback: a tiny class-conditional
pipeline with a tiny teacher, concurrent requests, and readable validation messages (never a traceback)."""
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from conftest import tiny_unet
from onestep.denoisers import denoiser_from_pretrained, load_teacher
from onestep.generators import OneStepGenerator
from onestep.pipelines import OneStepPipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "demo"))
import app as demo_app  # noqa: E402

gradio_client = pytest.importorskip("gradio_client")
N_CONCURRENT = 24


def make_pipeline(root: Path, teacher_dir: str | None, num_classes: int | None = 10) -> Path:
    """A tiny exported pipeline (8x8, random weights); its card names `teacher_dir` when given."""
    teacher = load_teacher(teacher_dir) if teacher_dir else None
    denoiser = teacher.clone() if teacher else denoiser_from_pretrained(tiny_unet(num_classes=num_classes),
                                                                        DDPMScheduler(beta_schedule="linear"))
    card = {"teacher": teacher_dir or "none", "method": "test", "fid": 12.5, "fid_protocol": "tiny protocol"}
    OneStepPipeline.from_generator(OneStepGenerator(denoiser, 2.5), denoiser.scheduler, card).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_teacher_dir):
    """The app on a free loopback port, in this process, for the whole module."""
    folder = make_pipeline(tmp_path_factory.mktemp("demo") / "pipeline", tiny_teacher_dir)
    demo = demo_app.Demo(folder)
    blocks = demo_app.create_demo(demo, concurrency=2)
    _, url, _ = demo_app.launch(blocks, port=None, prevent_thread_lock=True, quiet=True)
    client = gradio_client.Client(url, verbose=False)
    yield client, demo
    client.close()
    blocks.close()


def _call(client, class_label="all", seed=0, num_images=4, steps=1, hal_filter=False, compare_teacher=False):
    return client.predict(class_label, seed, num_images, steps, hal_filter, compare_teacher, api_name="/generate")


def test_api_names_exactly_the_controls_this_pipeline_has(served):
    client, demo = served
    assert demo.caps.num_classes == 10 and demo.caps.teacher and not demo.caps.extra_inputs
    params = [p["parameter_name"] for p in client.view_api(return_format="dict", print_info=False)
              ["named_endpoints"]["/generate"]["parameters"]]
    assert params == ["class_label", "seed", "num_images", "steps", "hal_filter", "compare_teacher"]


def test_one_request_returns_images_scores_latency_and_the_teacher(served):
    client, _ = served
    gallery, latency, teacher = _call(client, class_label="3", seed=5, num_images=4, steps=2, hal_filter=True,
                                      compare_teacher=True)
    assert len(gallery) == len(teacher) == 4
    assert all(Image.open(item["image"]).size == (8, 8) for item in gallery + teacher)
    assert all(re.fullmatch(r"3 · \d\.\de[-+]\d\d", item["caption"]) for item in gallery)  # class · score
    assert "ms per image" in latency and "2 step(s)" in latency and "kept the 4 lowest of 5" in latency
    assert "teacher:" in latency


def test_same_seed_same_images_as_the_pipeline(served):
    """The demo draws its noise as `pipe(generator=seed)` does, so users can reproduce a gallery in Python."""
    client, demo = served
    gallery, _, _ = _call(client, seed=11, num_images=3)
    expected = demo.pipe(batch_size=3, generator=torch.Generator().manual_seed(11), output_type="pil").images
    for item, image in zip(gallery, expected):
        assert Image.open(item["image"]).tobytes() == image.tobytes()


def test_concurrent_requests_all_succeed(served):
    client, _ = served
    jobs = [client.submit("all", seed, 2, 1 + seed % 4, seed % 2 == 0, False, api_name="/generate")
            for seed in range(N_CONCURRENT)]
    with ThreadPoolExecutor(N_CONCURRENT) as pool:
        results = list(pool.map(lambda job: job.result(timeout=120), jobs))
    assert len(results) == N_CONCURRENT
    assert all(len(gallery) == 2 and "ms per image" in latency for gallery, latency, _ in results)


@pytest.mark.parametrize("kwargs, message", [
    ({"seed": -1}, "seed must be a whole number in 0..4294967295, got -1"),
    ({"seed": "abc"}, "seed must be a whole number in 0..4294967295, got 'abc'"),
    ({"seed": 1.5}, "seed must be a whole number in 0..4294967295, got 1.5"),  # refused, not rounded to 2
    ({"num_images": 17}, "number of images must be a whole number in 1..16, got 17"),
    ({"num_images": 0}, "number of images must be a whole number in 1..16, got 0"),
    ({"steps": 5}, "steps must be a whole number in 1..4, got 5"),
    ({"class_label": "10"}, "class label must be a whole number in 0..9, got '10'"),
    ({"class_label": "7" * 1_000_000}, "class label must be a whole number in 0..9, got '777"),
    ({"hal_filter": "yes"}, "hallucination filter must be true or false, got 'yes'"),
    ({"compare_teacher": 1}, "compare with the teacher must be true or false, got 1"),
])
def test_invalid_inputs_get_a_readable_message(served, kwargs, message):
    """Our one-line validation, not Gradio's own preprocessing messages (5 lines, the whole value echoed)."""
    client, _ = served
    with pytest.raises(gradio_client.exceptions.AppError) as err:
        _call(client, **kwargs)
    text = str(err.value)
    assert message in text and "Traceback" not in text and "preprocess" not in text
    assert len(text) < 600 and "\n" not in text.strip()


def test_request_validation_messages():
    caps = demo_app.Capabilities(num_classes=10, max_steps=4, prompt=True, teacher=False,
                                 extra_inputs={"control_image": "image"})
    ok = {"prompt": " a cat ", "control_image": Image.new("RGB", (64, 48))}
    req = demo_app.Request.parse({"seed": 3.0, "num_images": 2, "steps": 4, "class_label": "9", **ok}, caps)
    assert (req.seed, req.class_label, req.prompt) == (3, "9", "a cat") and req.extras == {"control_image": ok[
        "control_image"]}
    assert req.labels(2, 10).tolist() == [9, 9]
    for values, message in [
        ({"num_images": 100}, "number of images must be a whole number in 1..16, got 100"),
        ({"steps": 0}, "steps must be a whole number in 1..4"),
        ({"class_label": "ten"}, "class label must be a whole number in 0..9, got 'ten'"),
        ({"compare_teacher": True}, "carries no loadable teacher"),
        ({"prompt": "   "}, "prompt is empty"),
        ({"prompt": "x" * 501}, "the limit is 500"),
        ({"control_image": None}, "upload a control image"),
        ({"control_image": Image.new("L", (4000, 10))}, "is 4000x10; width and height must be 8..2048"),
        ({"control_image": "file.png"}, "must be a PNG or JPEG picture"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            demo_app.Request.parse({**ok, **values}, caps)


def test_unconditional_pipeline_without_teacher_shows_fewer_controls(tmp_path):
    demo = demo_app.Demo(make_pipeline(tmp_path / "p", None, num_classes=None))
    assert demo.caps.num_classes is None and not demo.caps.teacher
    with demo_app.gr.Blocks():
        assert list(demo_app._controls(demo.caps, 16)) == ["seed", "num_images", "steps", "hal_filter"]
    result = demo.generate(demo_app.Request(num_images=3))
    assert [caption for _, caption in result.images] == ["", "", ""]
    assert "**NFE**: 1" in demo.card_markdown() and "**FID**: 12.50" in demo.card_markdown()


def test_missing_pipeline_is_a_one_line_cli_error(tmp_path, capsys, monkeypatch):
    from onestep.cli import main

    monkeypatch.setattr(demo_app, "DEFAULT_PIPELINES", (tmp_path / "none",))
    with pytest.raises(FileNotFoundError, match="run|onestep quickstart"):
        demo_app.find_pipeline()
    assert main(["demo", str(tmp_path / "missing")]) == 2
    assert "not an exported onestep pipeline folder" in capsys.readouterr().err


def test_points_generators_are_refused_with_a_reason(tmp_path):
    from diffusers import EDMEulerScheduler

    from onestep.denoisers import MLPModel

    denoiser = denoiser_from_pretrained(MLPModel(dim=2, hidden=16, depth=2), EDMEulerScheduler())
    OneStepPipeline.from_generator(OneStepGenerator(denoiser), denoiser.scheduler).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="vectors, not images"):
        demo_app.Demo(tmp_path)


def test_app_makes_no_outbound_connection_settings():
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False" and os.environ["HF_HUB_OFFLINE"] == "1"
