"""(noise, sample) pairs: the resumable multi-process writer, `onestep pairs`, and `pairs:DIR` data (issue 9 item 5)."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from distributed import launch_cpu_processes
from onestep.data import load_dataset, write_pairs
from onestep.data.pairs import shard_generator


class CountingSampler:
    """A deterministic stand-in for a teacher: sample = 2 noise + label; counts the rows it was asked for."""

    def __init__(self):
        self.rows = 0

    def __call__(self, noise, labels):
        self.rows += len(noise)
        return 2 * noise + (0 if labels is None else labels[:, None, None].float())


def write(out, fn=None, **kw):
    kw = {"noise_shape": (2, 3), "num": 10, "num_classes": 4, "seed": 7, "shard_size": 4, "batch_size": 3,
          "progress": False, **kw}
    return write_pairs(fn or CountingSampler(), out_dir=out, **kw)


def shard_bytes(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.glob("pairs_*.safetensors"))}


def test_pairs_round_trip_through_load_dataset(tmp_path):
    result = write(tmp_path / "p")
    assert (result.shards, result.written, result.skipped) == (3, 3, 0)
    assert sorted(shard_bytes(tmp_path / "p")) == [f"pairs_00000{i}.safetensors" for i in range(3)]
    data = load_dataset(f"pairs:{tmp_path / 'p'}")
    noise = data.extras["noise"]
    assert data.x.shape == noise.shape == (10, 2, 3) and data.num_classes == 4 and len(data) == 10
    assert torch.equal(data.labels, torch.arange(10) % 4)                 # balanced, row i has label i mod K
    assert torch.equal(data.x, 2 * noise + data.labels[:, None, None])   # each sample sits with its own noise
    assert torch.equal(noise[4:8], torch.randn((4, 2, 3), generator=shard_generator(7, 1)))  # shard 1 from (7, 1)
    sub = load_dataset(f"pairs:{tmp_path / 'p'}", num_samples=5, seed=3)
    assert len(sub) == 5 and torch.equal(sub.x, 2 * sub.extras["noise"] + sub.labels[:, None, None])
    write(tmp_path / "q", seed=8)
    assert not torch.equal(load_dataset(f"pairs:{tmp_path / 'q'}").x, data.x)  # the seed reaches the noise


def test_rerun_writes_only_missing_or_incomplete_shards(tmp_path):
    out = tmp_path / "p"
    write(out)
    before = shard_bytes(out)
    (out / "pairs_000001.safetensors").unlink()                                   # killed before shard 1
    (out / "pairs_000002.safetensors").write_bytes(before["pairs_000002.safetensors"][:50])  # killed mid-write
    (out / ".pairs_000001.safetensors.999.tmp").write_bytes(b"half")               # a killed writer's temp file
    sampler = CountingSampler()
    result = write(out, sampler)
    assert (result.written, result.skipped, sampler.rows) == (2, 1, 4 + 2)     # shards 1 and 2 only
    assert shard_bytes(out) == before and not list(out.glob(".*.tmp"))
    again = CountingSampler()
    assert write(out, again).written == 0 and again.rows == 0
    with pytest.raises(ValueError, match=r"other settings \(seed=7; now seed=8\)") as err:
        write(out, seed=8)
    assert "\n" not in str(err.value)


def test_unconditional_pairs(tmp_path):
    write(tmp_path / "p", num_classes=None, num=3, noise_shape=(5,), fn=lambda noise, labels: noise.flip(1))
    data = load_dataset(f"pairs:{tmp_path / 'p'}")
    assert data.labels is None and data.num_classes is None and data.kind == "points"
    assert torch.equal(data.x, data.extras["noise"].flip(1))


def test_pairs_folder_errors_are_one_line(tmp_path):
    out = tmp_path / "p"
    cases = [("missing", "not a directory; set data.name to pairs:"), ("empty", "no pairs_XXXXXX.safetensors shards")]
    (tmp_path / "empty").mkdir()
    for name, message in cases:
        with pytest.raises(ValueError, match=message):
            load_dataset(f"pairs:{tmp_path / name}")
    write(out)
    first = load_file(out / "pairs_000000.safetensors")
    save_file({**first, "sample": torch.zeros(4, 1, 8, 8)}, out / "pairs_000001.safetensors")
    with pytest.raises(ValueError, match=r"pairs_000001.safetensors: shapes noise \[2, 3\], sample \[1, 8, 8\], "
                                         r"class_labels do not match pairs_000000.safetensors's") as err:
        load_dataset(f"pairs:{out}")
    assert "\n" not in str(err.value)
    (out / "pairs_000001.safetensors").write_bytes(b"\x10" * 20)
    with pytest.raises(ValueError, match=r"pairs_000001.safetensors: corrupt shard \(truncated"):
        load_dataset(f"pairs:{out}")
    (out / "pairs_000001.safetensors").unlink()
    with pytest.raises(ValueError, match="incomplete, 1 of 3 shards missing .first pairs_000001.safetensors.; "
                                         "rerun the same writer"):
        load_dataset(f"pairs:{out}")
    write(out)
    with pytest.raises(ValueError, match="samples are \\[2, 3\\], not at resolution 8; remove data.resolution"):
        load_dataset(f"pairs:{out}", resolution=8)


class FakeRank:
    """accelerate's PartialState as seen by rank `index` of `count` (barriers are no-ops: ranks run in turn)."""

    def __init__(self, index, count):
        self.process_index, self.num_processes, self.is_main_process = index, count, index == 0
        self.device = torch.device("cpu")

    def wait_for_everyone(self):
        pass


def test_ranks_split_the_shards_without_duplicates(tmp_path, monkeypatch):
    import accelerate

    write(tmp_path / "one", num=22)
    written = {}
    for rank in (0, 1, 2):
        monkeypatch.setattr(accelerate, "PartialState", lambda rank=rank: FakeRank(rank, 3))
        sampler = CountingSampler()
        written[rank] = (write(tmp_path / "three", sampler, num=22).written, sampler.rows)
    assert written == {0: (2, 8), 1: (2, 8), 2: (2, 6)}  # shards 0,3 | 1,4 | 2,5 (rows 4+4 | 4+4 | 4+2)
    assert shard_bytes(tmp_path / "three") == shard_bytes(tmp_path / "one")


@pytest.mark.slow
def test_pairs_cli_one_and_two_processes_write_the_same_files(tiny_teacher_dir, tmp_path, one_thread, capsys):
    """`onestep pairs` on a class-conditional DDPM teacher: 1 process and 2 accelerate processes (gloo, one thread
    each) write byte-identical shards (3 shards: 2 on rank 0, 1 on rank 1, none twice); the samples are the teacher's
    Euler ODE from the stored noise, with labels i mod 10. (~40-70 s on a loaded 2-core machine.)"""
    from onestep.cli import main

    args = ["pairs", tiny_teacher_dir, "-n", "10", "--steps", "3", "--shard-size", "4", "--batch-size", "3",
            "--seed", "5"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert "10 pairs in 3 shards complete (3 written now" in capsys.readouterr().out
    launch_cpu_processes(["-m", "onestep", *args, "--out", str(tmp_path / "two")])
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two") and len(shard_bytes(tmp_path / "two")) == 3
    assert not list((tmp_path / "two").glob(".*"))

    from onestep.denoisers import load_teacher
    from onestep.sampling.samplers import sample_euler, teacher_sigmas

    data = load_dataset(f"pairs:{tmp_path / 'two'}")
    assert data.x.shape == (10, 1, 8, 8) and data.num_classes == 10 and torch.equal(data.labels, torch.arange(10))
    teacher = load_teacher(tiny_teacher_dir)
    again = sample_euler(teacher, data.extras["noise"], teacher_sigmas(teacher.schedule, 3), class_labels=data.labels)
    torch.testing.assert_close(data.x, again, rtol=1e-4, atol=1e-4)
