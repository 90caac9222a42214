"""LoRA students and fake scores through peft, for any model class (UNets, transformers, our MLPs).

peft's `inject_adapter_in_model` works on plain torch modules, so no model needs diffusers' PeftAdapterMixin.
Only LoRA parameters train; export either merges them into the weights (an ordinary model folder) or keeps them as
`pytorch_lora_weights.safetensors` next to the frozen base weights.
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
LORA_CONFIG = "onestep_lora_config.json"
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj", "proj_out", "ff.net.2")


def default_targets(model: nn.Module) -> list[str]:
    """The attention projections and residual convolutions/linears this model actually has."""
    names = {name for name, _ in model.named_modules()}
    found = [t for t in DEFAULT_TARGETS if any(n == t or n.endswith("." + t) for n in names)]
    if not found:  # small MLPs: every Linear inside the residual blocks
        found = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")]
    return found


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, targets: list[str] | None = None) -> nn.Module:
    """Freeze `model` and inject trainable rank-`rank` adapters; at initialisation the output is unchanged
    (LoRA's B matrices start at zero)."""
    from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets or default_targets(model))
    inject_adapter_in_model(config, model)
    model._onestep_lora_config = {"r": rank, "lora_alpha": alpha or rank, "target_modules": config.target_modules}
    return model


def has_lora(model: nn.Module) -> bool:
    return hasattr(model, "_onestep_lora_config")


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights and remove the LoRA layers (an ordinary model again)."""
    from diffusers.utils import recurse_remove_peft_layers
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    recurse_remove_peft_layers(model)
    del model._onestep_lora_config
    return model


def save_lora(model: nn.Module, folder: Path) -> None:
    """Write only the adapter weights (safetensors) and their config."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, folder / LORA_WEIGHTS)
    config = dict(model._onestep_lora_config, target_modules=sorted(model._onestep_lora_config["target_modules"]))
    (folder / LORA_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def load_lora(model: nn.Module, folder: Path) -> nn.Module:
    """Attach the adapter saved by `save_lora` to a freshly loaded base model."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    config = json.loads((folder / LORA_CONFIG).read_text())
    add_lora(model, config["r"], config["lora_alpha"], config["target_modules"])
    result = set_peft_model_state_dict(model, load_file(folder / LORA_WEIGHTS))
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"{folder / LORA_WEIGHTS}: weights that match no layer ({unexpected[0]}, ...)")
    return model
