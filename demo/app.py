"""Gradio demo over any exported onestep pipeline folder.

    python demo/app.py [PIPELINE_DIR] [--host 127.0.0.1] [--port 7860]
    onestep demo [PIPELINE_DIR]

PIPELINE_DIR defaults to the shipped assets/pipelines/digits16, else the quickstart's runs/quickstart/pipeline.
The app binds to 127.0.0.1 unless told otherwise, never opens a share link, and turns Gradio's analytics off, so it
makes no outbound connection. What it shows depends on what the pipeline has:

* a class-label dropdown when `pipe.num_classes`, a prompt box when `pipe.takes_prompt`; seed, number of images
  (capped per request), steps 1..`pipe.max_inference_steps`;
* one control per entry of `pipe.extra_inputs` (name -> "image": an upload, "text": a text box, "float": a number),
  passed to `pipe.generate(..., name=value)`;
* the hallucination filter (onestep.sampling.hallucination's one-step probe) when the class supports it: 25% extra
  candidates are generated and the ones with the highest score dropped; every image's score is in its caption;
* the teacher's 50-step sample of the same noise and labels, side by side, when the model card's `teacher` is a
  loadable local diffusers folder making samples of the generator's noise shape (about 50x slower: an option);
* latency per image, and the model card's facts (teacher, method, NFE, FID and how it was measured).

It uses only the pipeline protocol (`onestep.pipelines.GeneratorPipeline`) and `load_pipeline`, so any registered
pipeline class is served.

The Generate endpoint is also an API (`gradio_client.Client(url).predict(..., api_name="/generate")`). Requests go
through a queue with a concurrency limit, so the page stays responsive when many arrive at once; invalid inputs
get a one-line message, never a traceback.
"""
from __future__ import annotations

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no phoning home
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import inspect  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402
import torch  # noqa: E402
from diffusers import DiffusionPipeline  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402
from PIL import Image  # noqa: E402

from onestep.checks import shown  # noqa: E402
from onestep.data.images import ImageInputError, open_image  # noqa: E402
from onestep.pipelines import load_pipeline  # noqa: E402
from onestep.resources import ASSETS, REPO_ROOT  # noqa: E402
from onestep.sampling.hallucination import HalFilter  # noqa: E402
from onestep.sampling.samplers import sample_euler, teacher_sigmas  # noqa: E402

log = logging.getLogger("onestep.demo")

DEFAULT_PIPELINES = (ASSETS / "pipelines" / "digits16", Path("runs/quickstart/pipeline"),
                     REPO_ROOT / "runs" / "quickstart" / "pipeline")
MAX_IMAGES = 16          # per request: keeps one request from holding a worker for long
MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 500
CONTROL_SIDE = (8, 2048)  # accepted control-image width/height, pixels
TEACHER_STEPS = 50
HAL_EXTRA = 0.25          # filter on: generate 25% more candidates, keep the lowest-scoring
ALL_CLASSES = "all"
GALLERY = dict(columns=4, height="auto", object_fit="contain", format="png")  # png: lossless, exact pixel size
EXTRA_KINDS = ("image", "text", "float")
RESERVED = {"seed", "num_images", "steps", "class_label", "hal_filter", "compare_teacher", "prompt", "extras"}
CSS = "#student-gallery img, #teacher-gallery img { image-rendering: pixelated; }"


def find_pipeline(path: str | os.PathLike | None = None) -> Path:
    """The folder to serve: the one given, else the shipped one, else the quickstart's output."""
    candidates = [Path(path)] if path else DEFAULT_PIPELINES
    for candidate in candidates:
        if (candidate / "model_index.json").is_file():
            return candidate
    if path:
        raise FileNotFoundError(f"{path}: not an exported onestep pipeline folder (no model_index.json)")
    raise FileNotFoundError("no pipeline to serve: pass a folder, or create one with `onestep quickstart` "
                            f"(looked in {', '.join(str(c) for c in candidates)})")


@dataclass
class Capabilities:
    """What the loaded pipeline offers; the UI and the API show exactly these controls."""

    num_classes: int | None
    max_steps: int
    prompt: bool
    teacher: bool
    extra_inputs: dict[str, str] = field(default_factory=dict)   # name -> "image" | "text" | "float"
    hal_filter: bool = True

    @classmethod
    def of(cls, pipe, teacher) -> "Capabilities":
        extra = dict(pipe.extra_inputs)
        bad = {k: v for k, v in extra.items() if v not in EXTRA_KINDS or k in RESERVED}
        if bad:
            raise ValueError(f"{type(pipe).__name__}.extra_inputs {bad}: kinds must be {', '.join(EXTRA_KINDS)} and "
                             f"names not {', '.join(sorted(RESERVED))}")
        return cls(num_classes=pipe.num_classes, max_steps=pipe.max_inference_steps, prompt=pipe.takes_prompt,
                   teacher=teacher is not None, extra_inputs=extra, hal_filter=pipe.supports_hallucination_filter)


@dataclass
class Request:
    """One Generate click; `parse` builds it from the controls' values with every field checked."""

    seed: int = 0
    num_images: int = 8
    steps: int = 1
    class_label: str = ALL_CLASSES
    hal_filter: bool = False
    compare_teacher: bool = False
    prompt: str | None = None
    extras: dict = field(default_factory=dict)   # the pipeline's extra_inputs, checked

    @classmethod
    def parse(cls, values: dict, caps: Capabilities, max_images: int = MAX_IMAGES) -> "Request":
        """Check ranges and types; raise ValueError with a message a user can act on."""
        values = dict(values)
        extras = {name: values.pop(name, None) for name in caps.extra_inputs}
        req = cls(**values)
        req.hal_filter = _boolean("hallucination filter", req.hal_filter)
        req.compare_teacher = _boolean("compare with the teacher", req.compare_teacher)
        req.seed = _integer("seed", req.seed, 0, MAX_SEED)
        req.num_images = _integer("number of images", req.num_images, 1, max_images)
        req.steps = _integer("steps", req.steps, 1, caps.max_steps)
        if caps.num_classes and req.class_label != ALL_CLASSES:
            req.class_label = str(_integer("class label", req.class_label, 0, caps.num_classes - 1))
        if req.hal_filter and not caps.hal_filter:
            raise ValueError("this pipeline does not support the hallucination filter")
        if req.compare_teacher and not caps.teacher:
            raise ValueError("this pipeline carries no loadable teacher to compare with")
        if caps.prompt:
            req.prompt = _text("prompt", req.prompt, required=True)
        req.extras = {name: _extra(name, kind, extras[name]) for name, kind in caps.extra_inputs.items()}
        return req

    def labels(self, n: int, num_classes: int | None) -> torch.Tensor | None:
        if not num_classes:
            return None
        if self.class_label == ALL_CLASSES:
            return torch.arange(n) % num_classes
        return torch.full((n,), int(self.class_label))


def _extra(name: str, kind: str, value):
    """One extra input, checked by its kind."""
    name = name.replace("_", " ")
    if kind == "image":
        value = _uploaded_image(value, name)
        check_control_image(value, name)
        return value
    if kind == "text":
        return _text(name, value, required=False)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {_short(value)}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {_short(value)}")
    return number


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


def _integer(name: str, value, lo: int, hi: int) -> int:
    """A whole number in lo..hi: 1.5 is refused, not rounded (the API hands raw values, see create_demo)."""
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if not number.is_integer() or not lo <= number <= hi:
        raise ValueError(f"{name} must be a whole number in {lo}..{hi}, got {shown(value)}")
    return int(number)


def _boolean(name: str, value) -> bool:
    """A checkbox value: true or false (None: unset, false); "yes" or 1 are refused, not counted as true."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {shown(value)}")
    return value


def _text(name: str, value, required: bool) -> str:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name} must be text, got {type(value).__name__}")
    text = (value or "").strip()
    if required and not text:
        raise ValueError(f"{name} is empty")
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"{name} is {len(text)} characters long; the limit is {MAX_PROMPT_CHARS}")
    return text


def _uploaded_image(value, name: str = "control image"):
    """An upload as the API hands it over ({"path": ..., ...}, already checked by Gradio to be one of its uploads),
    decoded by onestep's image reader; a PIL image (Python callers) passes as is."""
    if isinstance(value, dict) and isinstance(value.get("path"), str):
        try:
            return open_image(value["path"], "RGB")
        except ImageInputError as err:  # the reason without the server-side path
            raise ValueError(f"the {name}: {str(err).split(': ', 1)[-1]}") from None
    return value


def check_control_image(image, name: str = "control image") -> None:
    """An image input must be a decoded image (Gradio hands over PIL) of sensible size."""
    if image is None:
        raise ValueError(f"upload a {name} (PNG or JPEG)")
    if not isinstance(image, Image.Image):
        raise ValueError(f"the {name} must be a PNG or JPEG picture, got {type(image).__name__}")
    lo, hi = CONTROL_SIDE
    if not (lo <= image.width <= hi and lo <= image.height <= hi):
        raise ValueError(f"the {name} is {image.width}x{image.height}; width and height must be {lo}..{hi}")


@dataclass
class Result:
    """What one request shows: captioned student images, the latency line, the teacher's images (if asked)."""

    images: list[tuple[Image.Image, str]]
    latency: str
    teacher_images: list[tuple[Image.Image, str]] = field(default_factory=list)


class Demo:
    """The model side of the app: a loaded pipeline, its optional teacher, and one method per request."""

    def __init__(self, pipeline_dir: str | os.PathLike | None = None, max_images: int = MAX_IMAGES,
                 base: str | os.PathLike | None = None):
        self.pipeline_dir = find_pipeline(pipeline_dir)
        self.pipe = load_pipeline(self.pipeline_dir)
        if base is not None:  # One More Step (OMSPipeline) in front of another diffusion base
            if not hasattr(self.pipe, "wrap"):
                raise ValueError(f"--base applies to One More Step pipelines; {type(self.pipe).__name__} is not one")
            self.pipe = self.pipe.wrap(load_pipeline(base))
        self.pipe.set_progress_bar_config(disable=True)
        if len(self.pipe.noise_shape) < 2:  # images, latents or tokens ([n, d], DD2Pipeline) decode to images
            raise ValueError(f"{self.pipeline_dir}: this generator makes {tuple(self.pipe.noise_shape)} vectors, not "
                             "images; the demo shows image generators (try `onestep sample`)")
        self.card = self.pipe.card
        # the side-by-side view runs the teacher on the same noise and labels (no prompt encoding): None, no view
        self.teacher = None if self.pipe.takes_prompt else self.pipe.card_teacher()[0]
        self.caps = Capabilities.of(self.pipe, self.teacher)
        self.max_images = max_images

    def generate(self, req: Request) -> Result:
        n = req.num_images + (math.ceil(req.num_images * HAL_EXTRA) if req.hal_filter else 0)
        rng = torch.Generator().manual_seed(req.seed)
        z = randn_tensor((n, *self.pipe.noise_shape), generator=rng, dtype=torch.float32)  # as pipe(generator=seed)
        labels = req.labels(n, self.caps.num_classes)
        inputs = dict(num_inference_steps=req.steps, class_labels=labels, generator=rng,
                      prompts=[req.prompt] * n if self.caps.prompt else None, **req.extras)
        start = time.perf_counter()
        if req.hal_filter:
            x = self.pipe.generate_latents(z, **inputs)
        else:
            x = self.pipe.generate(z, **inputs)
        seconds = time.perf_counter() - start
        captions = _captions(labels, n)
        keep, note = torch.arange(n), ""
        if req.hal_filter:
            keep, scores, note = self.hal_filter(x, labels, req)
            captions = [" · ".join(filter(None, (c, f"{s:.1e}"))) for c, s in zip(captions, scores.tolist())]
            x = self.pipe.decode_latents(x[keep.to(x.device)])
        else:
            x = x[keep.to(x.device)]
        images = list(zip(_to_pil(x), [captions[i] for i in keep]))
        latency = (f"**{1000 * seconds / n:.1f} ms per image** ({n} image(s) in {1000 * seconds:.0f} ms, "
                   f"{req.steps} step(s), seed {req.seed}){note}")
        teacher_images = []
        if req.compare_teacher:
            teacher_images, teacher_s = self.teacher_samples(z[keep], None if labels is None else labels[keep])
            latency += f" · teacher: {1000 * teacher_s / len(keep):.0f} ms per image ({TEACHER_STEPS} steps)"
        return Result(images, latency, teacher_images)

    def hal_filter(self, latents: torch.Tensor, labels, req: Request):
        """Score every candidate with the pipeline's one-step probe and keep the lowest. The probe denoises with the
        teacher when there is one (as bench/hallucination_toy.py does), else with the generator's own denoiser."""
        prompts = [req.prompt] * len(latents) if self.caps.prompt else None
        hal, _ = self.pipe.probe_hallucinations(latents, HalFilter(keep_n=req.num_images), labels, prompts,
                                                torch.Generator().manual_seed(req.seed))
        keep, scores = hal.kept, hal.scores
        dropped = sorted(set(range(len(latents))) - set(keep.tolist()))
        note = (f" · hallucination filter: kept the {len(keep)} lowest of {len(latents)}, dropped hal "
                + ", ".join(f"{scores[i]:.1e}" for i in dropped))
        return keep, scores, note

    def teacher_samples(self, z: torch.Tensor, labels):
        """The teacher's deterministic multi-step sample (Euler = DDIM for VP teachers) from the same noise."""
        cond = {} if labels is None else {"class_labels": labels}
        start = time.perf_counter()
        x = sample_euler(self.teacher, z, teacher_sigmas(self.teacher.schedule, TEACHER_STEPS), **cond)
        x = self.pipe.decode_latents(x)  # a latent teacher's samples through the generator's VAE
        seconds = time.perf_counter() - start
        return list(zip(_to_pil(x), _captions(labels, len(z)))), seconds

    def card_markdown(self) -> str:
        card = self.card
        fid = card.get("fid")
        fid_text = f"{fid:.2f}" if isinstance(fid, (int, float)) else "not measured"
        rows = [("teacher", card.get("teacher", "unknown")), ("method", card.get("method", "unknown")),
                ("NFE", card.get("nfe", 1)), ("FID", fid_text), ("FID protocol", card.get("fid_protocol", "-"))]
        facts = "\n".join(f"- **{k}**: {v}" for k, v in rows)
        shown = os.path.relpath(self.pipeline_dir) if Path.cwd() in Path(self.pipeline_dir).resolve().parents \
            else self.pipeline_dir  # a short path where it is one
        return f"**Model card** (`{shown}`)\n\n{facts}"


def _captions(labels, n: int) -> list[str]:
    """Short enough for a gallery thumbnail: the class label (if any); the filter appends the score."""
    return [str(int(c)) for c in labels] if labels is not None else [""] * n


def _to_pil(x: torch.Tensor) -> list[Image.Image]:
    images = (x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return DiffusionPipeline.numpy_to_pil(images)


def create_demo(demo: Demo, concurrency: int = 2, max_queue: int = 128) -> gr.Blocks:
    """The Blocks app: controls on the left, student (and teacher) galleries on the right, one /generate API."""
    caps = demo.caps
    with gr.Blocks(title="onestep demo") as blocks:
        gr.Markdown(f"## onestep — one-step generator · {demo.card.get('dataset') or demo.pipeline_dir.name}\n"
                    "A distilled generator makes each image in one network evaluation (or 2-4 with re-noising).")
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                inputs = _controls(caps, demo.max_images)
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                gr.Markdown(demo.card_markdown(), elem_id="card")
            with gr.Column(scale=3):
                with gr.Row():
                    student = gr.Gallery(label="one-step student (caption: class · hallucination score)",
                                         elem_id="student-gallery", **GALLERY)
                    teacher = gr.Gallery(label=f"teacher, {TEACHER_STEPS} steps, same noise",
                                         elem_id="teacher-gallery", visible=caps.teacher, **GALLERY)
                latency = gr.Markdown("Press **Generate**.", label="latency", elem_id="latency")
        outputs = [student, latency] + ([teacher] if caps.teacher else [])
        # preprocess=False: the handler gets the raw values and Request.parse checks every one in one line (Gradio's
        # own preprocessing rounds 1.5 to 2, passes "yes" as a checkbox value and answers in 5-line messages that
        # echo the whole value); uploads are still moved into Gradio's cache and checked by Gradio first.
        button.click(_endpoint(demo, list(inputs)), list(inputs.values()), outputs, api_name="generate",
                     preprocess=False)
    blocks.queue(default_concurrency_limit=concurrency, max_size=max_queue)
    return blocks


def _controls(caps: Capabilities, max_images: int) -> dict:
    """Only the controls the pipeline can use, keyed by the Request field they fill (the API's parameter names)."""
    controls = {}
    if caps.prompt:
        controls["prompt"] = gr.Textbox(label="prompt", max_length=MAX_PROMPT_CHARS)
    if caps.num_classes:
        choices = [("all classes, in turn", ALL_CLASSES)] + [(str(i), str(i)) for i in range(caps.num_classes)]
        controls["class_label"] = gr.Dropdown(choices, value=ALL_CLASSES, label="class label", elem_id="class-label")
    controls["seed"] = gr.Number(value=0, precision=0, label=f"seed (0..{MAX_SEED})", elem_id="seed")
    controls["num_images"] = gr.Slider(1, max_images, value=8, step=1, label="number of images",
                                       elem_id="num-images")
    if caps.max_steps > 1:
        controls["steps"] = gr.Slider(1, caps.max_steps, value=1, step=1, label="steps (network evaluations)",
                                      elem_id="steps")
    if caps.hal_filter:
        controls["hal_filter"] = gr.Checkbox(label="hallucination filter (score shown under each image)",
                                             elem_id="hal-filter")
    if caps.teacher:
        controls["compare_teacher"] = gr.Checkbox(label=f"compare with the teacher ({TEACHER_STEPS} steps, slow)",
                                                  elem_id="compare-teacher")
    for name, kind in caps.extra_inputs.items():
        label = name.replace("_", " ")
        if kind == "image":
            controls[name] = gr.Image(label=f"{label} (PNG/JPEG)", type="pil", sources=["upload", "clipboard"])
        elif kind == "text":
            controls[name] = gr.Textbox(label=label, max_length=MAX_PROMPT_CHARS)
        else:
            controls[name] = gr.Number(label=label)
    return controls


def _endpoint(demo: Demo, names: list[str]):
    """The click handler, with a signature naming the controls, so the API's parameters are named too."""
    def generate(*values):
        try:
            req = Request.parse(dict(zip(names, values)), demo.caps, demo.max_images)
            result = demo.generate(req)
        except ValueError as err:  # bad input (ours or the pipeline's): one readable line to the user
            raise gr.Error(" ".join(str(err).split())[:500], print_exception=False) from None
        except Exception as err:  # anything else: the user sees its name, the server log the traceback
            log.exception("generate failed")
            raise gr.Error(f"generation failed ({type(err).__name__}); see the server log") from None
        return (result.images, result.latency) + ((result.teacher_images,) if demo.caps.teacher else ())

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    generate.__signature__ = inspect.Signature([inspect.Parameter(name, kind) for name in names])
    return generate


def launch(blocks: gr.Blocks, host: str = "127.0.0.1", port: int | None = 7860, **kwargs):
    """Serve locally: no share link, no server-side rendering (it needs node), 5 MB upload cap. show_error: an
    input Gradio itself cannot parse (text for a number) reaches the user as Gradio's one-line reason."""
    return blocks.launch(server_name=host, server_port=port, share=False, ssr_mode=False, max_file_size="5mb",
                         show_error=True, css=CSS, **kwargs)


def run(args: argparse.Namespace) -> None:
    """`onestep demo` (options in onestep/cli.py): load, build, serve until Ctrl-C."""
    start = time.perf_counter()
    demo = Demo(args.pipeline, max_images=args.max_images, base=getattr(args, "base", None))
    blocks = create_demo(demo, concurrency=args.concurrency)
    print(f"onestep demo: {demo.pipeline_dir} loaded in {time.perf_counter() - start:.1f} s "
          f"(teacher comparison: {'on' if demo.teacher else 'off'})", flush=True)
    launch(blocks, args.host, args.port)


if __name__ == "__main__":  # `python demo/app.py ARGS` is `onestep demo ARGS`
    from onestep.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
