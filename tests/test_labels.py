"""Balanced (stratified) evaluation labels, exactly reproducible from the seed, and the trainer's evaluation using
them."""
import torch

from onestep.data.labels import balanced_labels, rows_with_labels


def test_balanced_labels_are_stratified_and_a_pure_function_of_the_seed():
    for n, k in [(1000, 10), (1003, 10), (7, 10), (0, 3), (50, 1)]:
        labels = balanced_labels(n, k, seed=0)
        counts = torch.bincount(labels, minlength=k)
        assert labels.dtype == torch.int64 and len(labels) == n and counts.sum() == n
        assert bool((labels >= 0).all() and (labels < k).all())
        assert counts.max() - counts.min() <= 1, (n, k, counts)
    torch.testing.assert_close(balanced_labels(1000, 10, 3), balanced_labels(1000, 10, 3), rtol=0, atol=0)
    assert not torch.equal(balanced_labels(1000, 10, 3), balanced_labels(1000, 10, 4))     # seeded order
    # pinned: the rule must not drift between versions (onestep fid and the trainer rely on the same sequence)
    assert balanced_labels(12, 5, 0).tolist() == [2, 4, 4, 1, 0, 4, 0, 3, 0, 2, 3, 1]


def test_rows_with_labels_pick_rows_of_the_wanted_class():
    data_labels = torch.tensor([2, 0, 1, 0, 2, 1, 1])
    wanted = balanced_labels(30, 3, seed=1)
    rows = rows_with_labels(data_labels, wanted)
    assert torch.equal(data_labels[rows], wanted)


def test_trainer_evaluation_uses_balanced_labels_and_keeps_its_noise_stream():
    from onestep.data import load_dataset
    from onestep.training.trainer import generate

    data = load_dataset("digits", resolution=8, seed=0)
    data.cond = {"class_labels": data.labels}
    seen_noise, seen_labels = [], []

    def sample_fn(noise, class_labels):
        seen_noise.append(noise)
        seen_labels.append(class_labels)
        return noise

    generate(sample_fn, data, (1, 8, 8), n=1000, seed=1, device="cpu")
    labels = torch.cat(seen_labels)
    assert torch.bincount(labels, minlength=10).tolist() == [100] * 10      # random rows gave 76 to 118 per class
    assert torch.equal(labels, balanced_labels(1000, 10, 1))
    # the noise is the stream it always was: per batch of 250, noise then a row draw, from one seeded generator
    g = torch.Generator().manual_seed(1)
    expected = []
    for _ in range(4):
        expected.append(torch.randn((250, 1, 8, 8), generator=g))
        torch.randint(len(data), (250,), generator=g)
    assert torch.equal(torch.cat(seen_noise), torch.cat(expected))
