"""onestep.data.images, the one image reader: 16-bit images scaled (not clipped), bombs and mixed sizes refused, and
every consumer (training folders, `onestep fid` folders, the demo's upload) going through it."""
import numpy as np
import pytest
import torch
from PIL import Image

from onestep.data import load_dataset
from onestep.data.images import MAX_PIXELS, ImageFolderDataset, ImageInputError, read_image


def _gray16(path, seed=0, size=8):
    """A 16-bit gray PNG (mode I;16) with values spread over 0..65535, and its exact 8-bit equivalent."""
    eight = np.random.default_rng(seed).integers(0, 256, (size, size)).astype(np.uint16)
    Image.fromarray(eight * 257).save(path)
    assert Image.open(path).mode == "I;16"
    return eight.astype(np.uint8)


def test_16_bit_png_is_scaled_to_8_bits_not_saturated(tmp_path):
    expected = _gray16(tmp_path / "a.png")
    assert np.array_equal(read_image(tmp_path / "a.png", "L")[..., 0], expected)
    assert np.array_equal(read_image(tmp_path / "a.png", "RGB"), np.repeat(expected[..., None], 3, axis=-1))
    clipped = np.asarray(Image.open(tmp_path / "a.png").convert("L"))
    assert (clipped == 255).mean() > 0.9  # what PIL's convert does, and what training and FID used to see


def test_training_folder_and_fid_folder_read_16_bit_images_like_their_8_bit_twins(tmp_path):
    (tmp_path / "wide").mkdir()
    (tmp_path / "narrow").mkdir()
    for i in range(3):
        expected = _gray16(tmp_path / "wide" / f"{i}.png", seed=i)
        Image.fromarray(expected).save(tmp_path / "narrow" / f"{i}.png")
    wide = load_dataset(f"folder:{tmp_path / 'wide'}", resolution=8, channels=1)
    narrow = load_dataset(f"folder:{tmp_path / 'narrow'}", resolution=8, channels=1)
    assert torch.equal(wide.x, narrow.x) and wide.x.mean() < 0.5
    files = lambda d: sorted(str(p) for p in (tmp_path / d).iterdir())  # noqa: E731
    fid_wide, fid_narrow = ImageFolderDataset(files("wide")), ImageFolderDataset(files("narrow"))
    assert all(torch.equal(fid_wide[i], fid_narrow[i]) for i in range(3))
    assert fid_wide[0].dtype == torch.uint8 and fid_wide[0].shape == (3, 8, 8)


def test_bombs_and_mixed_sizes_are_refused_naming_the_file(tmp_path):
    Image.new("L", (1, MAX_PIXELS + 1)).save(tmp_path / "tall.png")
    with pytest.raises(ImageInputError, match=r"tall\.png: 1x\d+ pixels is more than the limit"):
        read_image(tmp_path / "tall.png", "L")
    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    Image.new("L", (8, 9)).save(tmp_path / "b.png")
    with pytest.raises(ImageInputError, match=r"different sizes \(a\.png is 8x8, b\.png is 8x9\)"):
        ImageFolderDataset([tmp_path / "a.png", tmp_path / "b.png"])


def test_the_demo_decodes_uploads_with_the_same_reader(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "demo"))
    import app as demo_app

    caps = demo_app.Capabilities(num_classes=None, max_steps=4, prompt=False, teacher=False,
                                 extra_inputs={"control_image": "image"})
    expected = _gray16(tmp_path / "control.png", size=16)
    req = demo_app.Request.parse({"control_image": {"path": str(tmp_path / "control.png")}}, caps)
    image = req.extras["control_image"]
    assert image.mode == "RGB" and np.array_equal(np.asarray(image)[..., 0], expected)
    (tmp_path / "bomb.png").write_bytes(bytes.fromhex(  # a PNG header declaring 100000 x 100000 pixels
        "89504e470d0a1a0a0000000d49484452000186a0000186a008000000008d3954140000000049454e44ae426082"))
    with pytest.raises(ValueError, match=r"^the control image: refused as a decompression bomb") as err:
        demo_app.Request.parse({"control_image": {"path": str(tmp_path / "bomb.png")}}, caps)
    assert str(tmp_path) not in str(err.value)  # the server-side path is not shown to the client
