"""The Fashion-MNIST clips dataset: labels that need time, real items, written as .mp4 and read back exactly."""

import json

import torch

from vistok.data import load_fashion_mnist
from vistok.video import kinetics_csv, read_video
from vistok.video.datasets import kinetics_classes
from vistok.video.fmnist_clips import CLASSES, FRAMES, ClipSpec, _shrink, draw_specs, make_clip, write_dataset


def _items():
    images, labels = load_fashion_mnist("test")
    return _shrink(images[:50]), labels[:50]


def _column_of_mass(frame):
    cols = torch.arange(frame.shape[1], dtype=torch.float64)
    weights = torch.from_numpy(frame).double().sum(0)
    return float((weights * cols).sum() / weights.sum())


def test_motion_and_swap():
    items, labels = _items()
    right = make_clip(ClipSpec(item=0, direction=1, offset=5, swap_item=None, swap_frame=None), items)
    left = make_clip(ClipSpec(item=0, direction=0, offset=5, swap_item=None, swap_frame=None), items)
    assert right.shape == (FRAMES, 28, 28)
    assert _column_of_mass(right[-1]) - _column_of_mass(right[0]) > 10
    assert _column_of_mass(left[-1]) - _column_of_mass(left[0]) < -10
    assert (right[::-1] == left).all()  # the same positions, visited in the other order: no frame tells them apart
    other = int(torch.nonzero(labels != labels[0])[0])
    swapped = make_clip(ClipSpec(item=0, direction=3, offset=2, swap_item=other, swap_frame=7), items)
    still = make_clip(ClipSpec(item=0, direction=3, offset=2, swap_item=None, swap_frame=None), items)
    assert (swapped[:7] == still[:7]).all() and not (swapped[7:] == still[7:]).all()


def test_specs_are_balanced_and_swaps_change_category():
    _, labels = load_fashion_mnist("test")
    specs = draw_specs(400, labels, torch.Generator().manual_seed(0))
    assert torch.equal(torch.bincount(torch.tensor([s.label for s in specs])), torch.full((8,), 50))
    for spec in specs:
        if spec.swap_item is not None:
            assert labels[spec.swap_item] != labels[spec.item] and FRAMES // 3 <= spec.swap_frame <= 2 * FRAMES // 3
    again = draw_specs(400, labels, torch.Generator().manual_seed(0))
    assert again == specs


def test_written_clips_read_back_through_vistok_video(tmp_path):
    write_dataset(tmp_path, train_clips=8, test_clips=8, seed=3, progress=False)
    videos = kinetics_csv(tmp_path / "test.csv", tmp_path, split="test", classes=list(CLASSES))
    assert len(videos) == 8 and sorted(s.label for s in videos.samples) == list(range(8))
    listed = (tmp_path / "classes.txt").read_text().splitlines()  # in the order of the labels a model learns
    assert listed == kinetics_classes(tmp_path / "train.csv") == json.loads((tmp_path / "manifest.json").read_text(
    ))["classes"]
    images, labels = load_fashion_mnist("train")
    train_specs = draw_specs(8, labels, torch.Generator().manual_seed(3))
    frames = read_video(tmp_path / "train" / "fmtr000000_000000_000002.mp4")
    expected = torch.from_numpy(make_clip(train_specs[0], _shrink(images)))
    assert frames.shape == (FRAMES, 28, 28, 3)
    assert int((frames[..., 0].int() - expected.int()).abs().max()) <= 1  # limited-range luma
