"""Run under `accelerate launch` by test_distributed.py: train a few steps, then every rank dumps its weights."""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_run_config  # noqa: E402
from onestep.training.trainer import Trainer, step_generator  # noqa: E402

teacher, out, method = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
methods = {"sid": dict(loss="sid"), "ui_fkl_gan": dict(loss="ui", divergence="fkl", gan_weight=0.01)}
trainer = Trainer(tiny_run_config(teacher, out, steps=4, generator_optimizer={"lr": 1e-3},
                                  fake_optimizer={"lr": 1e-3}, **methods[method]))
trainer.train()
rank = trainer.accelerator.process_index
tensors = {f"{name}.{k}": v.detach().cpu().contiguous()
           for name, module in trainer.modules.items() for k, v in module.state_dict().items()}
tensors["first_batch_labels"] = trainer.data.labels[
    torch.randint(len(trainer.data), (4,), generator=step_generator(0, 0, rank, "cpu"))].cpu()
teacher_weights = trainer.teacher.model.state_dict()
moved = max((v - teacher_weights[k]).abs().max() for k, v in trainer.method.gen.denoiser.model.state_dict().items())
tensors["generator_moved"] = torch.tensor([float(moved)])
save_file(tensors, out / f"rank{rank}_of_{trainer.accelerator.num_processes}.safetensors")
