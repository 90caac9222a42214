"""Parameters and memory per real-teacher recipe: measured on tiny same-class components, estimated at real size.

    python bench/memory.py            # prints a markdown table (README "Memory")

Measured: each recipe runs 2 training steps on tiny random components of the real classes in a fresh process;
"peak MB" is that process's peak RSS growth during training (CPU). Estimated: the real architectures are built
on the `meta` device (no memory, no download) to count parameters exactly, full and with the recipe's LoRA, and
the training state is priced per parameter: frozen teacher in its dtype; a fully trained network costs 16 B/param
(fp32 weights, grads, two Adam moments) + 4 B/param of EMA for the generator; a LoRA network costs its frozen fp32
base (4 B/param) + 20 B per adapter parameter. Activations are not included (they depend on batch and resolution).
"""
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

RECIPES = {  # recipe -> (tiny builder in tests/tiny_teachers.py, real architecture below, lora in the recipe)
    "cifar10_ddpm_sid.yaml": ("pixel_ddpm", "ddpm_cifar10"),
    "sd15_dmd2_lora.yaml": ("stable_diffusion", "sd15"),
    "sd21_vpred_sid.yaml": ("stable_diffusion", "sd21"),
    "sd3_flow_sid.yaml": ("stable_diffusion_3", "sd3_medium"),
}
REAL = {  # published configs of the real teachers' networks
    "ddpm_cifar10": ("UNet2DModel", dict(sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
                                         down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                                           "DownBlock2D"),
                                         up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))),
    "sd15": ("UNet2DConditionModel", dict(sample_size=64, cross_attention_dim=768)),
    "sd21": ("UNet2DConditionModel", dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                                          use_linear_projection=True)),
    "sd3_medium": ("SD3Transformer2DModel", dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16,
                                                 num_layers=24, attention_head_dim=64, num_attention_heads=24,
                                                 joint_attention_dim=4096, caption_projection_dim=1536,
                                                 pooled_projection_dim=2048, pos_embed_max_size=192)),
}
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def measure_tiny(recipe: str, builder: str, extra: tuple[str, ...] = ()) -> dict:
    """Run in a child process: 2 steps of the recipe on a tiny teacher; parameters and peak RSS growth."""
    code = f"""
import json, resource, sys, tempfile, torch
from pathlib import Path
sys.path.insert(0, {str(HERE.parent / 'tests')!r})
torch.set_num_threads(1)
import tiny_teachers as tt
from onestep.resources import recipe_path
from onestep.training.config import load_config
from onestep.training.trainer import Trainer
root = Path(tempfile.mkdtemp())
teacher = tt.{builder}(root / "teacher")
data = ["data.name=digits", "data.resolution=8", "data.channels=3"] if "cifar" in {recipe!r} else \\
       [f"data.name=prompts:{{tt.prompts_file(root / 'p.txt')}}"]
config = load_config(recipe_path({recipe!r}), [f"output_dir={{root / 'run'}}", f"teacher.path={{teacher}}",
    "train.steps=2", "train.batch_size=2", "train.mixed_precision=no", "eval.enabled=false", *data, *{list(extra)!r}])
trainer = Trainer(config)
count = lambda m, trainable=False: sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rss = int(open("/proc/self/statm").read().split()[1]) * 4096 / 1024
trainer.train()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"teacher": count(trainer.teacher), "generator": count(trainer.method.gen),
    "generator_trainable": count(trainer.method.gen, True), "fake_trainable": count(trainer.method.fake, True),
    "peak_mb": (peak - min(before, rss)) / 1024}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def estimate_real(arch: str, recipe_config) -> dict:
    import diffusers
    import torch

    from onestep.lora import add_lora

    class_name, kwargs = REAL[arch]
    with torch.device("meta"):
        model = getattr(diffusers, class_name)(**kwargs)
    total = sum(p.numel() for p in model.parameters())
    method = recipe_config.method
    rank = method.generator_network.lora_rank
    lora = 0
    if rank:
        with torch.device("meta"):
            add_lora(model, rank)
        lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    teacher = total * BYTES[recipe_config.teacher.dtype]
    per_network = (4 * total + 20 * lora) if rank else 16 * total
    ema = 4 * (lora if rank else total)
    gib = (teacher + 2 * per_network + ema) / 2**30
    return {"params": total, "trainable": lora or total, "gib": gib}


def main():
    from onestep.resources import recipe_path
    from onestep.training.config import load_config

    print("| recipe | tiny: teacher / trainable G / trainable fake params | tiny: peak MB (2 steps, CPU) | "
          "real: network params | real: trainable per network | real: est. GiB (weights+grads+Adam+EMA) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for recipe, (builder, arch) in RECIPES.items():
        tiny = measure_tiny(recipe, builder)
        with tempfile.TemporaryDirectory():
            real = estimate_real(arch, load_config(recipe_path(recipe)))
        print(f"| {recipe} | {tiny['teacher']:,} / {tiny['generator_trainable']:,} / {tiny['fake_trainable']:,} | "
              f"{tiny['peak_mb']:.0f} | {real['params'] / 1e6:,.0f} M | {real['trainable'] / 1e6:,.1f} M | "
              f"{real['gib']:.1f} |")
    print()
    print("| SD-class student (tiny, 2 steps) | trainable G params | trainable fake params | peak MB |")
    print("| --- | --- | --- | --- |")
    for label, rank in (("full", 0), ("LoRA r=4", 4)):
        tiny = measure_tiny("sd15_dmd2_lora.yaml", "stable_diffusion", (
            f"method.generator_network.lora_rank={rank}", f"method.fake_network.lora_rank={rank}"))
        print(f"| {label} | {tiny['generator_trainable']:,} | {tiny['fake_trainable']:,} | {tiny['peak_mb']:.0f} |")


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    main()
