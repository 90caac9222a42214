"""How strong is the GAN term next to the distillation loss? Measures what `method.gan_weight` means at our loss
scale, to set it from SiDA's balance instead of copying SiDA's number.

Our generator loss is  generator_loss_scale * mean_i[ sum_elements(...) / wf_i ]  +  gan_weight * mean_i BCE_i,
while SiDA / Uni-Instruct's official code (a-little-hoof/Uni_Instruct `fsim_loss.py` and `fsim_training_loop.py`,
lsg = 100, lsg_gan = 0.01) divides the GAN term by wf_i and multiplies it by the number of elements C*H*W:

    SiDA:  lsg_gan * mean_i[ C*H*W / wf_i ] * mean BCE    =>   gan_weight  =  lsg_gan * mean_i[ C*H*W / wf_i ].

The script prints that equivalent weight (wf measured on the recipe's generator-loss noise draw), and the measured
gradient norms on x0 = G(z) of the distillation term and of the GAN term at unit weight, with the fake score and
its logit head first trained for --fake-steps on the (frozen) generator's samples.

    python bench/gan_scale.py                                   # digits16 teacher, the shipped SiD student
    python bench/gan_scale.py --student none                    # the teacher-initialised generator (step 0)
    python bench/gan_scale.py --recipe recipes/gaussian_grid_sid.yaml --student none
    python bench/gan_scale.py --set method.fake_optimizer.lr=1e-3   # a discriminator that has learned something
"""
from __future__ import annotations

import argparse
import tempfile

import torch

from onestep.methods.base import batch_from_data, frozen
from onestep.training.config import load_config
from onestep.training.trainer import Trainer, _Context, step_generator


class _Fixed(torch.nn.Module):
    """Stands in for the generator: returns a fixed leaf x0 so that gradients on x0 can be read."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0

    def forward(self, z, **cond):
        return self.x0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="recipes/quickstart_digits16.yaml")
    parser.add_argument("--student", default="assets/pipelines/digits16", help="a exported pipeline folder whose "
                        "network replaces the generator's, or 'none' (the teacher-initialised generator)")
    parser.add_argument("--loss", default="sid", choices=["sid", "dmd", "ui"])
    parser.add_argument("--fake-steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=8, help="generator-loss draws averaged")
    parser.add_argument("--lsg-gan", type=float, default=0.01, help="SiDA's GAN weight to translate")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe overrides, e.g. method.fake_optimizer.lr=1e-3 (a faster discriminator)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        overrides = [f"output_dir={out}", "method.gan_weight=1", f"method.loss={args.loss}", "method.divergence=rkl",
                     f"train.batch_size={args.batch}", *args.overrides]
        trainer = Trainer(load_config(args.recipe, overrides))
        method = trainer.method
        if args.student != "none":
            from diffusers import UNet2DModel

            student = UNet2DModel.from_pretrained(args.student, subfolder="unet", use_safetensors=True)
            method.gen.denoiser.model.load_state_dict(student.state_dict())
        method.gen.requires_grad_(False)

        def batch(step):
            rng = step_generator(0, step, 0, "cpu")
            return batch_from_data(trainer.data, torch.randint(len(trainer.data), (args.batch,), generator=rng)), rng

        for step in range(args.fake_steps):  # the fake score and its head learn the (fixed) generator
            b, rng = batch(step)
            logs = method.fake_score_step(b, _Context(trainer, step, rng))
        print(f"after {args.fake_steps} fake-score steps: " + ", ".join(f"{k} {v:.4g}" for k, v in logs.items()))

        numel_over_wf, g_dist, g_gan, l_dist, l_gan = [], [], [], [], []
        for k in range(args.repeats):
            b, _ = batch(10_000 + k)
            with torch.no_grad():
                x0 = method.gen(method.noise(b, _Context(trainer, 0, step_generator(1, k, 0, "cpu"))), **b.cond)
            grads = {}
            for weight in (0.0, 1.0):
                leaf = x0.clone().requires_grad_(True)
                trainer.prepared["generator"] = _Fixed(leaf)
                method.config.gan_weight = weight if weight else 1e-30
                with frozen(method.fake):
                    loss, logs = method.generator_loss(b, _Context(trainer, 10**6, step_generator(2, k, 0, "cpu")))
                loss.backward()
                grads[weight] = leaf.grad.flatten(1)
            g_dist.append(grads[0.0].norm(dim=1).mean())
            g_gan.append((grads[1.0] - grads[0.0]).norm(dim=1).mean())
            l_dist.append(logs["loss/generator"])
            l_gan.append(logs["loss/generator_gan"])
            sigma = method.generator_sigmas(len(b), _Context(trainer, 0, step_generator(3, k, 0, "cpu")), "cpu")
            with torch.no_grad():
                x_t = x0 + sigma.reshape(-1, *[1] * (x0.dim() - 1)) * torch.randn_like(x0)
                wf = (x0 - method.denoiser(x_t, sigma, **b.cond)).abs().flatten(1).mean(1).clamp_min(1e-5)
            numel_over_wf.append((x0[0].numel() / wf).mean())
        mean = lambda xs: float(torch.as_tensor(xs, dtype=torch.float64).mean())  # noqa: E731
        equiv = args.lsg_gan * mean(numel_over_wf)
        ratio = mean(g_dist) / mean(g_gan)
        print(f"recipe {args.recipe}, loss {args.loss}, student {args.student}, sample numel {x0[0].numel()}")
        print(f"  mean C*H*W/wf = {mean(numel_over_wf):.4g}  ->  SiDA's lsg_gan {args.lsg_gan} is gan_weight "
              f"{equiv:.4g} here")
        print(f"  distillation term: loss {mean(l_dist):.4g}, |grad x0| {mean(g_dist):.4g} per sample; GAN term "
              f"(weight 1): BCE {mean(l_gan):.4g}, |grad x0| {mean(g_gan):.4g} per sample")
        print(f"  equal gradient norms at gan_weight {ratio:.4g}; at gan_weight {equiv:.4g} the GAN gradient is "
              f"{equiv / ratio:.3g}x the distillation gradient")


if __name__ == "__main__":
    main()
