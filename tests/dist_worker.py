"""Run under `accelerate launch` by the distributed tests: train a recipe (with --set style overrides), then every
rank dumps its trainable weights and the data rows it drew first.

    python dist_worker.py RECIPE.yaml OUT_DIR [KEY=VALUE ...]
"""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import sparse_method  # noqa: F401  (registers the test-only method "sparse_pool")
from onestep.training.config import load_config
from onestep.training.trainer import Trainer, step_generator

recipe, out, overrides = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
trainer = Trainer(load_config(recipe, [f"output_dir={out}", *overrides]))
learner = trainer.modules[trainer.method.ema_network]
initial = {k: v.clone() for k, v in learner.state_dict().items()}
trainer.train()
rank, config = trainer.accelerator.process_index, trainer.config
tensors = {f"{name}.{k}": v.detach().cpu().contiguous()
           for name, module in trainer.modules.items() for k, v in module.state_dict().items()}
tensors["first_rows"] = torch.randint(len(trainer.data), (config.train.batch_size,),
                                      generator=step_generator(config.seed, 0, rank, "cpu"))
final = learner.state_dict()
tensors["generator_moved"] = torch.tensor([max(float((final[k] - v).abs().max()) for k, v in initial.items())])
tensors.update({f"initial.{k}": v.contiguous() for k, v in initial.items()})
if hasattr(trainer.method, "drawn"):  # the sparse test method: which heads each step trained
    tensors["drawn"] = torch.tensor(trainer.method.drawn)
save_file(tensors, out / f"rank{rank}_of_{trainer.accelerator.num_processes}.safetensors")
