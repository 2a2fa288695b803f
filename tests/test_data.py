from __future__ import annotations

import pytest
import torch
from PIL import Image

from hwslim.importing.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from hwslim.importing.data import (
    SYNTHETIC_MEAN,
    SYNTHETIC_STD,
    DataError,
    build_data,
    carve_search_split,
    crop_flip,
    normalize,
    parse_data_spec,
    random_resized_crop_flip,
    search_split,
    synthetic_data_info,
    synthetic_images,
    validation_split,
)
from hwslim.core.errors import HwslimError
from hwslim.models import create_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_synthetic_is_deterministic_and_subsets_match():
    x, y = synthetic_images(range(600), seed=3, input_size=16)
    assert x.shape == (600, 3, 16, 16) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    x2, y2 = synthetic_images(range(600), seed=3, input_size=16)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    # any subset is rebuilt exactly, in the order asked
    xs, ys = synthetic_images([599, 3, 300], seed=3, input_size=16)
    assert torch.equal(xs, x[[599, 3, 300]]) and torch.equal(ys, y[[599, 3, 300]])
    # another seed or split is another dataset
    assert not torch.equal(synthetic_images(range(8), seed=4, input_size=16)[0], x[:8])
    assert not torch.equal(synthetic_images(range(8), seed=3, input_size=16, split="val")[0], x[:8])


def test_synthetic_size_follows_input_size():
    x, _ = synthetic_images(range(4), input_size=40)
    assert x.shape == (4, 3, 40, 40)


def test_synthetic_classes_are_not_separable_by_colour_alone():
    # the class lives in the texture: per-class mean colours stay close to each other
    x, y = synthetic_images(range(2000), input_size=16)
    means = torch.stack([x[y == c].float().mean((0, 2, 3)) for c in range(10)])
    assert float((means - means.mean(0)).abs().max()) < 8.0  # out of 255


def test_parse_data_spec(tmp_path):
    assert parse_data_spec("synthetic").kind == "synthetic"
    assert parse_data_spec("synthetic:500").num_train == 500
    assert parse_data_spec("cifar10:/some/where").root == "/some/where"
    assert parse_data_spec(str(tmp_path)).kind == "imagefolder"
    with pytest.raises(DataError, match="not 'synthetic'"):
        parse_data_spec(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="integer"):
        parse_data_spec("synthetic:lots")


def test_synthetic_class_count_is_part_of_the_spec_and_rebuilt_from_the_checkpoint():
    """The demo's task, synthetic:N:20, where width matters; the default stays the 10-class task."""
    spec = parse_data_spec("synthetic:2600:20")
    assert (spec.num_train, spec.num_classes) == (2600, 20) and parse_data_spec("synthetic:500").num_classes is None
    x, y = synthetic_images(range(600), seed=3, input_size=16, classes=20)
    assert set(y.tolist()) == set(range(20))
    x10, y10 = synthetic_images(range(600), seed=3, input_size=16)  # the default: the same 10-class images as before
    assert torch.equal((x10, y10)[1], synthetic_images(range(600), seed=3, input_size=16, classes=10)[1])
    data = build_data("synthetic:300:20", 16, search_size=30)
    assert data.info["num_classes"] == 20 and len(data.info["classes"]) == 20
    ckpt = Checkpoint(create_model("resnet20", width_mult=0.25, input_size=16, num_classes=20), data=data.info)
    xs, ys = search_split(ckpt)  # rebuilt with the 20 classes it was generated with
    assert len(xs) == 30 and int(ys.max()) < 20
    for bad, match in (("synthetic:300:1", "C >= 2"), ("synthetic:300:many", "integer C")):
        with pytest.raises(DataError, match=match):
            parse_data_spec(bad)


def test_search_split_is_a_seeded_partition_of_the_training_set():
    train, search = carve_search_split(100, 10, seed=1)
    assert len(search) == 10 and len(train) == 90
    assert sorted(train.tolist() + search.tolist()) == list(range(100))
    assert torch.equal(search, carve_search_split(100, 10, seed=1)[1])
    assert not torch.equal(search, carve_search_split(100, 10, seed=2)[1])
    with pytest.raises(DataError, match="must leave training images"):
        carve_search_split(10, 10, seed=0)


def test_search_split_from_a_checkpoint_rebuilds_the_recorded_images(tmp_path):
    info = synthetic_data_info(num_train=700, num_search=50, seed=5, input_size=16, num_val=80)
    assert info["format"] == "hwslim-data" and info["num_train_total"] == 700 and len(info["search_indices"]) == 50
    net = create_model("resnet20", width_mult=0.5, input_size=16)
    path = save_checkpoint(tmp_path / "c.pt", net, data=info)
    ckpt = load_checkpoint(path)  # weights_only=True round trip of the data dict
    x, y = search_split(ckpt)
    assert x.shape == (50, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    raw, labels = synthetic_images(info["search_indices"], seed=5, input_size=16)
    assert torch.equal(y, labels)
    assert torch.allclose(x, normalize(raw, SYNTHETIC_MEAN, SYNTHETIC_STD))
    xm, ym = search_split(Checkpoint(net, data=info), max_images=7)  # spread over the split, not its first 7
    assert torch.equal(xm, x[[0, 7, 14, 21, 28, 35, 42]]) and torch.equal(ym, y[[0, 7, 14, 21, 28, 35, 42]])
    xv, yv = validation_split(ckpt)
    assert xv.shape == (80, 3, 16, 16) and len(yv) == 80
    assert validation_split(ckpt, max_images=30)[0].shape[0] == 30


def test_search_split_refuses_a_checkpoint_without_data():
    net = create_model("resnet20", width_mult=0.5, input_size=16)
    with pytest.raises(DataError, match="records no dataset"):
        search_split(Checkpoint(net))
    assert issubclass(DataError, HwslimError)


@pytest.mark.parametrize("bad", [0, -5, 2.5, True])
def test_search_and_validation_split_refuse_a_max_images_below_one(bad):
    info = synthetic_data_info(num_train=200, num_search=30, seed=1, input_size=8, num_val=20)
    for fn in (search_split, validation_split):
        with pytest.raises(DataError, match="--max-images must be a whole number of at least 1"):
            fn(info, max_images=bad)
    assert search_split(info, max_images=1)[0].shape[0] == 1  # the smallest valid value works
    assert validation_split(info, max_images=1)[0].shape[0] == 1


def test_build_data_keeps_search_images_out_of_training():
    data = build_data("synthetic:300", 16, search_size=40, seed=2, num_val=20)
    assert len(data) == 260 and len(data.info["search_indices"]) == 40
    assert set(data.train_idx.tolist()).isdisjoint(data.info["search_indices"])
    raw, _ = synthetic_images(data.train_idx, seed=2, input_size=16)
    assert torch.equal(data.images, raw)


def test_batches_are_seeded_and_ranks_split_the_epoch():
    data = build_data("synthetic:300", 16, search_size=44, seed=0, num_val=20)  # 256 training images
    a = list(data.batches(epoch=0, batch_size=32, seed=1))
    b = list(data.batches(epoch=0, batch_size=32, seed=1))
    assert len(a) == data.steps_per_epoch(32) == 8
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert a[0][0].shape == (32, 3, 16, 16) and a[0][0].dtype == torch.float32
    c = list(data.batches(epoch=1, batch_size=32, seed=1))
    assert not torch.equal(a[0][1], c[0][1])
    # two ranks see disjoint halves of the same epoch
    order = {r: [] for r in range(2)}
    for r in range(2):
        sampler = data._sampler(epoch=0, rank=r, world=2, seed=1)
        order[r] = list(iter(sampler))
    assert len(order[0]) == len(order[1]) == 128 and set(order[0]).isdisjoint(order[1])
    assert len(list(data.batches(epoch=0, batch_size=32, rank=1, world=2, seed=1))) == 4


def test_crop_flip_moves_whole_images():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8) + 1
    out = crop_flip(x, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):  # each output is one window of the padded image, maybe mirrored
        windows = [w for oy in range(5) for ox in range(5) for w in
                   (padded[i, :, oy:oy + 8, ox:ox + 8], padded[i, :, oy:oy + 8, ox:ox + 8].flip(-1))]
        assert any(torch.equal(out[i], w) for w in windows)


def test_random_resized_crop_flip_shape():
    x = torch.rand(4, 3, 24, 24)
    out = random_resized_crop_flip(x, torch.Generator().manual_seed(0), size=20)
    assert out.shape == (4, 3, 20, 20) and torch.isfinite(out).all()


def write_png(img: torch.Tensor, path: str) -> None:
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(path)


def _image_folder(root, split_sizes, size=12):
    g = torch.Generator().manual_seed(0)
    for split, n in split_sizes.items():
        for c in ("ant", "bee"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                img = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)
                if c == "bee":
                    img[0] = 255  # a learnable cue
                write_png(img, str(d / f"{i}.png"))


def test_image_folder_round_trip(tmp_path):
    _image_folder(tmp_path, {"train": 10, "test": 3})
    data = build_data(str(tmp_path), 12, search_size=4, seed=0)
    info = data.info
    assert info["kind"] == "imagefolder" and info["classes"] == ["ant", "bee"] and info["val_split"] == "test"
    assert info["num_train_total"] == 20 and data.images.shape == (16, 3, 12, 12)
    x, y = search_split(info)
    assert x.shape == (4, 3, 12, 12)
    # the bee images carry a saturated red channel, exactly as decoded
    red = x[:, 0] * info["std"][0] + info["mean"][0]
    assert torch.allclose(red[y == 1], torch.ones_like(red[y == 1]), atol=1e-4)
    xv, yv = validation_split(info)
    assert xv.shape == (6, 3, 12, 12) and sorted(yv.tolist()) == [0, 0, 0, 1, 1, 1]
    # an image added after training moves the indices: refuse rather than score other images
    write_png(torch.zeros(3, 12, 12, dtype=torch.uint8), str(tmp_path / "train" / "ant" / "new.png"))
    with pytest.raises(DataError, match="changed since training"):
        search_split(info)


def test_image_folder_needs_val_or_test(tmp_path):
    _image_folder(tmp_path, {"train": 2})
    with pytest.raises(DataError, match="neither val/ nor test/"):
        build_data(str(tmp_path), 12, search_size=1)


def test_cifar_without_files_says_how_to_fetch(tmp_path):
    with pytest.raises(DataError, match="--download"):
        build_data(f"cifar10:{tmp_path}", 32)


def test_large_inputs_stream_with_random_resized_crops(tmp_path):
    _image_folder(tmp_path, {"train": 6, "val": 2}, size=24)
    data = build_data(str(tmp_path), 72, search_size=2, seed=0, workers=0)
    assert not data.in_memory and data.images is None
    batches = list(data.batches(epoch=0, batch_size=4, seed=0))
    assert len(batches) == 2 and batches[0][0].shape == (4, 3, 72, 72) and batches[0][0].dtype == torch.float32
    again = list(data.batches(epoch=0, batch_size=4, seed=0))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))  # seeded per epoch
    x, _ = search_split(data.info)  # eval view: resize + center crop
    assert x.shape == (2, 3, 72, 72)


def test_balanced_subset_is_class_balanced_seeded_and_fills_short_classes():
    from hwslim.importing.data import balanced_subset

    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 4)
    a = balanced_subset(labels, 11, seed=0)
    assert len(a) == 11 and len(set(a.tolist())) == 11 and torch.equal(a, a.sort().values)
    counts = torch.bincount(labels[a], minlength=3).tolist()
    assert sorted(counts) == [3, 4, 4]
    assert torch.equal(a, balanced_subset(labels, 11, seed=0)) and not torch.equal(a, balanced_subset(labels, 11, 1))
    # class 2 has only 4 images: it gives all of them, the others share the rest evenly
    assert torch.bincount(labels[balanced_subset(labels, 60, seed=0)], minlength=3).tolist() == [28, 28, 4]
    with pytest.raises(DataError, match="--train-subset"):
        balanced_subset(labels, 85, seed=0)


def test_train_subset_for_synthetic_and_image_folder(tmp_path):
    data = build_data("synthetic:1000", 8, seed=3, num_val=20, train_subset=200)
    info = data.info
    pool = torch.tensor(info["train_subset_indices"])
    assert info["train_subset"] == 200 and info["train_subset_seed"] == 3 and len(pool) == 200
    assert info["num_train_total"] == 1000 and info["num_train"] == 180 and len(data) == 180
    assert len(info["search_indices"]) == 20 and set(info["search_indices"]) <= set(pool.tolist())
    labels = synthetic_images(pool, seed=3, input_size=8)[1]
    assert torch.bincount(labels, minlength=10).tolist() == [20] * 10
    assert torch.equal(data.labels, synthetic_images(data.train_idx, seed=3, input_size=8)[1])
    x, y = search_split(info)  # the checkpoint's record rebuilds the same search images
    assert x.shape == (20, 3, 8, 8)
    _image_folder(tmp_path, {"train": 10, "test": 3})
    folder = build_data(str(tmp_path), 12, search_size=2, seed=0, train_subset=8)
    assert folder.info["train_subset"] == 8 and folder.images.shape == (6, 3, 12, 12)
    sub = folder.info["train_subset_indices"]
    assert [folder.source.train_labels()[i].item() for i in sub].count(1) == 4
    assert set(folder.info["search_indices"]) <= set(sub)
    xs, _ = search_split(folder.info)
    assert xs.shape == (2, 3, 12, 12)
