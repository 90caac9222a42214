"""`onestep merge-weights BASE NITRO CUSTOM --out DIR`: CUSTOM + (NITRO - BASE) over safetensors folders (NitroFusion's
weight arithmetic), refusing folders whose tensors do not line up."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from onestep.cli import main


def _folder(path, tensors, config=None):
    (path / "unet").mkdir(parents=True)
    save_file(tensors, str(path / "unet" / "diffusion_pytorch_model.safetensors"))
    (path / "unet" / "config.json").write_text(json.dumps(config or {"name": path.name}))
    return path


def _weights(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(4, 3, generator=g).to(dtype), "b.bias": torch.randn(5, generator=g).to(dtype),
            "steps": torch.tensor([7 + seed])}


def test_custom_plus_the_distillation_delta(tmp_path, capsys):
    base, nitro, custom = (_folder(tmp_path / n, _weights(s)) for n, s in (("base", 0), ("nitro", 1), ("custom", 2)))
    assert main(["merge-weights", str(base), str(nitro), str(custom), "--out", str(tmp_path / "out")]) == 0
    assert "2 tensors merged" in capsys.readouterr().out
    out = load_file(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors")
    b, n, c = _weights(0), _weights(1), _weights(2)
    for key in ("a.weight", "b.bias"):
        assert torch.allclose(out[key], c[key] + n[key] - b[key])
    assert torch.equal(out["steps"], c["steps"])                      # integer buffers: CUSTOM's
    assert json.loads((tmp_path / "out" / "unet" / "config.json").read_text()) == {"name": "custom"}
    # nitro == base: the custom weights come back unchanged; bf16 custom stays bf16
    main(["merge-weights", str(base), str(base), str(custom), "--out", str(tmp_path / "same")])
    same = load_file(tmp_path / "same" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(same[k], c[k]) for k in c)
    half = _folder(tmp_path / "half", _weights(2, torch.bfloat16))
    main(["merge-weights", str(base), str(nitro), str(half), "--out", str(tmp_path / "out16")])
    assert load_file(tmp_path / "out16" / "unet" / "diffusion_pytorch_model.safetensors")["a.weight"].dtype == \
        torch.bfloat16


@pytest.mark.parametrize("change,message", [
    (lambda w: w.pop("b.bias"), "has no tensor 'b.bias'"),
    (lambda w: w.update(extra=torch.zeros(1)), "has a tensor 'extra' .* that BASE lacks"),
    (lambda w: w.update({"a.weight": torch.zeros(3, 4)}), r"'a.weight' .* is \[4, 3\] in BASE but \[3, 4\] in NITRO"),
])
def test_mismatched_folders_are_refused_in_one_line(tmp_path, capsys, change, message):
    weights = _weights(1)
    change(weights)
    base, nitro, custom = _folder(tmp_path / "base", _weights(0)), _folder(tmp_path / "nitro", weights), \
        _folder(tmp_path / "custom", _weights(2))
    assert main(["merge-weights", str(base), str(nitro), str(custom), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("onestep merge-weights: error: merge-weights:") and "\n" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_pickles_and_existing_outputs_are_refused(tmp_path, capsys):
    base = _folder(tmp_path / "base", _weights(0))
    (tmp_path / "w.bin").write_bytes(b"x")
    assert main(["merge-weights", str(tmp_path / "w.bin"), str(base), str(base), "--out", str(tmp_path / "o")]) == 2
    assert "pickles" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    assert main(["merge-weights", str(base), str(base), str(base), "--out", str(tmp_path / "taken")]) == 2
    assert "exists" in capsys.readouterr().err
