"""Input pipelines: CIFAR-10/100 and SVHN through TensorFlow Datasets, Fashion-MNIST from its IDX
files (Debian's ``dataset-fashion-mnist``; TFDS where they are absent), and the bundled digits.

Conventions shared by every dataset (and by the exporter, which bakes the same normalisation into
its serving graph):

* pixels live on the **0..255** scale; :class:`DatasetInfo` ``mean``/``std`` are per-channel on
  that scale and are the single source of truth for normalisation ``(x - mean) / std``;
* ``load(split="train")`` reads :attr:`DatasetInfo.train_split`, which for SVHN is
  ``"train+extra"`` (604,388 images) as in the DMRNet paper;
* training augmentation is the standard ResNet/DMRNet one: zero-pad 4 pixels per side, random
  32x32 crop, random horizontal flip -- without the flip for digits and SVHN, whose classes
  (digits) are not mirror-symmetric;
* Fashion-MNIST's 28x28 grayscale images are zero-padded to 32x32 and repeated over three
  channels, so every builder's CIFAR variant applies; its constants are those of the padded
  training images.

Two pipelines, the same batches: ``tf.data`` (the default under the TensorFlow backend) and a
``keras.utils.PyDataset`` in NumPy (:mod:`keras_dmr.data.sampling`: any backend, no TensorFlow).
For the in-memory sources (digits, Fashion-MNIST's files, :func:`from_arrays`) both follow one
:func:`~keras_dmr.data.sampling.epoch_plan` per epoch, drawn from ``(seed, epoch)``; TFDS sources
are tf.data only.

A dataset that is neither on disk nor downloadable raises :class:`DatasetUnavailableError`,
which says how to get it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import os

import keras
import numpy as np

from keras_dmr.data import fashion_mnist
from keras_dmr.data.digits import digits_mean_std, load_digits_arrays
from keras_dmr.data.sampling import PAD, ArrayBatches, epoch_plan

SUPPORTED = ("digits", "fashion_mnist", "cifar10", "cifar100", "svhn_cropped")
SPLITS = ("train", "test")
PIPELINES = ("auto", "tf.data", "pydataset")
_TFDS_SHUFFLE_BUFFER = 10_000


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static description of a supported dataset; needs no download.

    ``mean`` and ``std`` are per-channel on the 0..255 pixel scale. ``train_split`` and
    ``test_split`` are the TFDS split strings that ``load(split="train" | "test")`` reads;
    ``train_examples`` is how many images ``load(split="train")`` yields.

    Args:
        name: the dataset's name in :data:`SUPPORTED`.
        num_classes: number of labels.
        image_shape: ``(height, width, channels)`` of the pipeline's images.
        mean: per-channel mean, 0..255 scale.
        std: per-channel standard deviation, 0..255 scale.
        class_names: the labels' names.
        train_split: TFDS split string of ``split="train"``.
        test_split: TFDS split string of ``split="test"``.
        train_examples: images of ``split="train"``.
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: tuple[str, ...]
    train_split: str
    test_split: str
    train_examples: int


_DIGIT_NAMES = tuple(str(i) for i in range(10))

_CIFAR10_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

# Official fine-label order (``fine_label_names`` in the CIFAR-100 ``meta`` file): alphabetical.
_CIFAR100_NAMES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip

# Per-channel pixel statistics of the training sets, 0..255 scale (the usual 0..1 constants
# x 255: CIFAR-10 (0.4914, 0.4822, 0.4465) / (0.2470, 0.2435, 0.2616); CIFAR-100
# (0.5071, 0.4865, 0.4409) / (0.2673, 0.2564, 0.2762); SVHN (0.4377, 0.4438, 0.4728) /
# (0.1980, 0.2010, 0.1970)). The SVHN values are those of the 73,257-image "train" split; the
# "train+extra" statistics differ by well under 1% and are not worth a second convention.
_TFDS_INFOS = {
    "cifar10": DatasetInfo(
        name="cifar10",
        num_classes=10,
        image_shape=(32, 32, 3),
        mean=(125.307, 122.950, 113.865),
        std=(62.993, 62.089, 66.705),
        class_names=_CIFAR10_NAMES,
        train_split="train",
        test_split="test",
        train_examples=50_000,
    ),
    "cifar100": DatasetInfo(
        name="cifar100",
        num_classes=100,
        image_shape=(32, 32, 3),
        mean=(129.304, 124.070, 112.434),
        std=(68.170, 65.392, 70.418),
        class_names=_CIFAR100_NAMES,
        train_split="train",
        test_split="test",
        train_examples=50_000,
    ),
    # Computed from the 60,000 training images padded to 32x32 (72.94 / 90.02 over the 28x28
    # pixels); tests/test_data.py recomputes them from the files where they are installed.
    "fashion_mnist": DatasetInfo(
        name="fashion_mnist",
        num_classes=10,
        image_shape=(32, 32, 3),
        mean=(55.845, 55.845, 55.845),
        std=(84.612, 84.612, 84.612),
        class_names=fashion_mnist.CLASS_NAMES,
        train_split="train",
        test_split="test",
        train_examples=60_000,
    ),
    "svhn_cropped": DatasetInfo(
        name="svhn_cropped",
        num_classes=10,
        image_shape=(32, 32, 3),
        mean=(111.614, 113.169, 120.564),
        std=(50.490, 51.255, 50.235),
        class_names=_DIGIT_NAMES,
        train_split="train+extra",
        test_split="test",
        train_examples=604_388,
    ),
}

# Horizontal flips turn digits into non-digits ("2" -> mirrored "2"), so they are off for both
# digit datasets; pad + crop (small translations) stays.
_FLIP = {
    "digits": False,
    "fashion_mnist": True,
    "cifar10": True,
    "cifar100": True,
    "svhn_cropped": False,
}


class DatasetUnavailableError(RuntimeError):
    """A dataset that is not on this machine and could not be downloaded."""


def _check_name(name: str) -> None:
    if not isinstance(name, str) or name not in SUPPORTED:
        raise ValueError(f"name must be one of {SUPPORTED}; got {name!r}")


def dataset_info(name: str) -> DatasetInfo:
    """Return the :class:`DatasetInfo` of ``name`` (one of :data:`SUPPORTED`), offline.

    For ``"digits"`` the mean/std are computed once (cached) from the bundled training split.

    Args:
        name: a dataset name.

    Returns:
        Its :class:`DatasetInfo`.
    """
    _check_name(name)
    if name == "digits":
        mean, std = digits_mean_std()
        return DatasetInfo(
            name="digits",
            num_classes=10,
            image_shape=(32, 32, 3),
            mean=mean,
            std=std,
            class_names=_DIGIT_NAMES,
            train_split="train",
            test_split="test",
            train_examples=len(load_digits_arrays("train")[1]),
        )
    return _TFDS_INFOS[name]


def augment_image(image, seed, *, flip: bool, pad: int = PAD):
    """Zero-pad ``pad`` pixels per side, take a random crop of the original size, maybe flip.

    ``image`` is one ``(H, W, C)`` image on the raw pixel scale (padding with 0 = black, as in the
    ResNet/DMRNet papers, so it must run before normalisation). ``seed`` is a stateless ``[2]``
    int seed: the same seed always gives the same crop and flip. With ``flip=False`` the result is
    a pure translation of the input (vacated pixels are zero). TFDS sources only: in-memory ones
    follow :func:`~keras_dmr.data.sampling.epoch_plan`.
    """
    import tensorflow as tf

    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    out = tf.image.stateless_random_crop(padded, size=tf.shape(image), seed=crop_seed)
    if flip:
        out = tf.image.stateless_random_flip_left_right(out, seed=flip_seed)
    return out


def _arrays(name: str, split: str, data_dir: str | None) -> tuple | None:
    """The uint8 ``(images, labels)`` of an in-memory source, or None (a TFDS one)."""
    if name == "digits":
        return load_digits_arrays(split)
    if name == "fashion_mnist" and fashion_mnist.find_files(data_dir) is not None:
        return fashion_mnist.load_fashion_mnist_arrays(split, data_dir)
    return None


def _planned_dataset(images, labels, *, shuffle, augment, flip, seed):
    """The unbatched uint8 ``(image, label)`` tf.data source that follows
    :func:`~keras_dmr.data.sampling.epoch_plan`: a new plan each time it is iterated (each
    epoch of ``fit``), applied by TensorFlow ops that move the same pixels as
    :class:`~keras_dmr.data.sampling.ArrayBatches`."""
    import tensorflow as tf

    n = len(labels)
    epochs = itertools.count()

    def plans():
        plan = epoch_plan(n, next(epochs), seed=seed, shuffle=shuffle, augment=augment, flip=flip)
        yield plan.order, plan.rows, plan.cols, plan.flips

    spec = (
        tf.TensorSpec([n], tf.int64),
        tf.TensorSpec([n], tf.int32),
        tf.TensorSpec([n], tf.int32),
        tf.TensorSpec([n], tf.bool),
    )
    all_images, all_labels = tf.constant(images), tf.constant(labels)

    def pick(i, row, col, flipped):
        image = tf.gather(all_images, i)
        if augment:
            padded = tf.pad(image, [[PAD, PAD], [PAD, PAD], [0, 0]])
            image = tf.slice(padded, tf.stack([row, col, 0]), tf.shape(image))
            image = tf.cond(flipped, lambda: tf.reverse(image, [1]), lambda: image)
        return image, tf.gather(all_labels, i)

    ds = tf.data.Dataset.from_generator(plans, output_signature=spec).unbatch()
    ds = ds.apply(tf.data.experimental.assert_cardinality(n))  # as a tensor-slices source
    return ds.map(pick, num_parallel_calls=tf.data.AUTOTUNE)


def _tfds_source(name, tfds_split, *, shuffle, data_dir, seed):
    """The unbatched uint8 ``(image, label)`` source of a TFDS dataset and its shuffle buffer."""
    # Imported lazily: TFDS is slow to import and not needed for local data.
    import tensorflow as tf
    import tensorflow_datasets as tfds

    try:
        ds = tfds.load(
            name,
            split=tfds_split,
            data_dir=data_dir,
            as_supervised=True,
            shuffle_files=shuffle,
            read_config=tfds.ReadConfig(shuffle_seed=seed),
        )
    except ImportError as err:  # TFDS' own dependencies, not the network
        raise DatasetUnavailableError(
            f"dataset {name!r} cannot be prepared: TensorFlow Datasets needs the module "
            f"{err.name or str(err)!r}, which is not installed (`pip install "
            '"keras-dmr[data]"` installs what TFDS needs)'
        ) from None
    except Exception as err:  # TFDS raises many kinds (download, missing files, DNS)
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        hint = (
            fashion_mnist.INSTALL_HINT
            if name == "fashion_mnist"
            else "TensorFlow Datasets downloads it on first use: run once with network access, or "
            "copy a prepared TFDS directory here and pass `data_dir`"
        )
        where = data_dir or "TFDS' default directory (~/tensorflow_datasets)"
        raise DatasetUnavailableError(
            f"dataset {name!r} is not in {where} and could not be downloaded "
            f"({type(err).__name__}: {reason}); {hint}"
        ) from None
    if name == "fashion_mnist":  # 28×28×1 → the 32×32×3 of the local files
        ds = ds.map(
            lambda image, label: (
                tf.tile(tf.pad(image, [[2, 2], [2, 2], [0, 0]]), [1, 1, 3]),
                label,
            )
        )
    return ds, _TFDS_SHUFFLE_BUFFER


def _check_flag(value: bool | None, arg: str) -> None:
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{arg} must be True, False or None; got {value!r}")


def tensorflow_available() -> bool:
    """Whether TensorFlow can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):  # a broken or blocked installation
        return False


def default_pipeline() -> str:
    """The pipeline ``pipeline="auto"`` picks for the in-memory sources.

    Returns:
        ``"tf.data"`` under the TensorFlow backend (with TensorFlow installed), else
        ``"pydataset"`` (JAX, PyTorch: no TensorFlow needed).
    """
    if keras.backend.backend() == "tensorflow" and tensorflow_available():
        return "tf.data"
    return "pydataset"


def _check_positive(value, arg: str, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        prefix = "None or " if optional else ""
        raise ValueError(f"{arg} must be {prefix}an integer >= 1; got {value!r}")


def load(
    name: str = "digits",
    split: str = "train",
    *,
    batch_size: int = 64,
    augment: bool | None = None,
    shuffle: bool | None = None,
    data_dir: str | None = None,
    seed: int | None = 0,
    drop_remainder: bool = False,
    normalize: bool = True,
    take: int | None = None,
    pipeline: str = "auto",
    workers: int = 1,
):
    """Batched ``(images float32 [B, 32, 32, 3], labels int32 [B])`` of a dataset.

    Two pipelines yield the same batches for the same arguments: ``tf.data`` (a prefetched
    ``tf.data.Dataset``) and ``pydataset`` (a ``keras.utils.PyDataset`` in NumPy, for any
    backend, without TensorFlow). For the in-memory sources (digits, Fashion-MNIST from its
    files) both follow :func:`~keras_dmr.data.sampling.epoch_plan`: order, crops and flips drawn
    from ``(seed, epoch)``. TFDS sources (CIFAR, SVHN, Fashion-MNIST without its files) stream
    through tf.data only, shuffled by TFDS, and need TensorFlow.

    Args:
        name: one of :data:`SUPPORTED`; ``"digits"`` is bundled, ``"fashion_mnist"`` is read
            from its IDX files (``data_dir``, else Debian's location, else TFDS), the others
            come from TFDS (downloaded into ``data_dir`` on first use).
        split: ``"train"`` (reads ``DatasetInfo.train_split``, i.e. train+extra for SVHN) or
            ``"test"``.
        batch_size: images per batch (>= 1).
        augment: pad-4/crop/flip augmentation (see module docstring); default: on for train only.
        shuffle: shuffle (reshuffled every epoch); default: on for train only.
        data_dir: TFDS data directory, or Fashion-MNIST's IDX files (``None``: the default
            places); ignored for digits.
        seed: seeds shuffling and augmentation so that a pipeline built twice yields the same
            epochs; ``None`` for a fresh random stream.
        drop_remainder: drop the last, smaller batch.
        normalize: ``(x - mean) / std`` with the :class:`DatasetInfo` constants; ``False`` gives
            raw 0..255 float32 pixels.
        take: only the first ``take`` examples of the split, in the source's stored order (the
            same subset every epoch and every seed; shuffling and augmentation apply within it),
            for runs that must fit a small machine. Not class-balanced by construction: the
            local sources (digits, Fashion-MNIST) are stored in a mixed class order. ``None``:
            the whole split.
        pipeline: ``"tf.data"``, ``"pydataset"`` or ``"auto"`` (:func:`default_pipeline` for
            the in-memory sources: tf.data under the TensorFlow backend; tf.data for TFDS).
        workers: threads preparing batches of the ``pydataset`` pipeline.

    Returns:
        A ``tf.data.Dataset`` or a :class:`~keras_dmr.data.sampling.ArrayBatches` of
        ``(images, labels)`` batches (``Model.fit`` takes either).
    """
    _check_name(name)
    if not isinstance(split, str) or split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    _check_positive(batch_size, "batch_size")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be None or an integer >= 0; got {seed!r}")
    _check_flag(augment, "augment")
    _check_flag(shuffle, "shuffle")
    _check_positive(take, "take", optional=True)
    _check_positive(workers, "workers")
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline must be one of {PIPELINES}; got {pipeline!r}")
    if data_dir is not None:
        if not isinstance(data_dir, str | os.PathLike):
            raise ValueError(f"data_dir must be None or a path; got {data_dir!r}")
        data_dir = os.fspath(data_dir)

    info = dataset_info(name)
    training = split == "train"
    augment = training if augment is None else augment
    shuffle = training if shuffle is None else shuffle
    tfds_split = info.train_split if training else info.test_split
    arrays = _arrays(name, tfds_split, data_dir)
    if pipeline == "auto":  # TFDS sources stream through tf.data whatever the backend
        pipeline = default_pipeline() if arrays is not None else "tf.data"
    _check_pipeline(pipeline, streamed=name if arrays is None else None)
    if pipeline == "pydataset" and arrays is None:
        raise DatasetUnavailableError(
            f"dataset {name!r} streams from TensorFlow Datasets, which needs TensorFlow and the "
            "tf.data pipeline; the pydataset pipeline reads digits and Fashion-MNIST from its "
            f"IDX files ({fashion_mnist.INSTALL_HINT})"
        )
    if arrays is not None:
        images, labels = arrays
        if take is not None:
            images, labels = images[:take], labels[:take]
        return _in_memory(
            images,
            labels,
            pipeline,
            mean=info.mean if normalize else None,
            std=info.std if normalize else None,
            batch_size=batch_size,
            shuffle=shuffle,
            augment=augment,
            flip=_FLIP[name] and augment,
            seed=seed,
            drop_remainder=drop_remainder,
            workers=workers,
        )
    return _tfds_pipeline(
        name,
        info,
        tfds_split,
        batch_size=batch_size,
        augment=augment,
        shuffle=shuffle,
        data_dir=data_dir,
        seed=seed,
        drop_remainder=drop_remainder,
        normalize=normalize,
        take=take,
    )


def from_arrays(
    images,
    labels,
    *,
    batch_size: int = 64,
    shuffle: bool = False,
    augment: bool = False,
    flip: bool = True,
    seed: int | None = 0,
    drop_remainder: bool = False,
    normalize: bool = True,
    pipeline: str = "auto",
    workers: int = 1,
):
    """Batches of images a user holds in memory, as :func:`load` makes them: the same epoch
    plans (order, pad-4 crops, flips), the same two pipelines.

    Args:
        images: ``[N, H, W, C]`` pixels on the 0..255 scale (uint8 or float).
        labels: ``[N]`` integer labels.
        batch_size: images per batch.
        shuffle: a new order every epoch.
        augment: pad-4 random crops every epoch.
        flip: random horizontal flips too (with ``augment``).
        seed: seeds the plans (None: fresh randomness).
        drop_remainder: drop the last, smaller batch.
        normalize: ``(x - mean) / std`` per channel, with these images' own statistics
            (``False``: raw pixels as float32).
        pipeline: ``"tf.data"``, ``"pydataset"`` or ``"auto"`` (as :func:`load`).
        workers: threads of the ``pydataset`` pipeline.

    Returns:
        A ``tf.data.Dataset`` or a :class:`~keras_dmr.data.sampling.ArrayBatches`.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"images must be [N, H, W, C] and labels [N]; got {images.shape} and {labels.shape}"
        )
    if len(labels) == 0:
        raise ValueError("images is empty")
    _check_positive(batch_size, "batch_size")
    _check_positive(workers, "workers")
    for value, arg in ((shuffle, "shuffle"), (augment, "augment"), (flip, "flip")):
        if not isinstance(value, bool):
            raise ValueError(f"{arg} must be True or False; got {value!r}")
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline must be one of {PIPELINES}; got {pipeline!r}")
    pipeline = default_pipeline() if pipeline == "auto" else pipeline
    _check_pipeline(pipeline)
    mean = std = None
    if normalize:
        pixels = images.reshape(-1, images.shape[-1]).astype(np.float64)
        mean, std = tuple(pixels.mean(0)), tuple(np.maximum(pixels.std(0), 1e-6))
    return _in_memory(
        images,
        labels,
        pipeline,
        mean=mean,
        std=std,
        batch_size=batch_size,
        shuffle=shuffle,
        augment=augment,
        flip=flip and augment,
        seed=seed,
        drop_remainder=drop_remainder,
        workers=workers,
    )


def _check_pipeline(pipeline: str, streamed: str | None = None) -> None:
    """Refuse tf.data without TensorFlow; ``streamed``: the TFDS dataset asked for, if any."""
    if pipeline == "tf.data" and not tensorflow_available():
        if streamed:
            raise DatasetUnavailableError(
                f"dataset {streamed!r} streams from TensorFlow Datasets, which needs TensorFlow "
                '(`pip install "keras-dmr[data]"`); without it, digits, Fashion-MNIST from its '
                "IDX files and data.from_arrays load through the pydataset pipeline"
            )
        raise DatasetUnavailableError(
            "pipeline 'tf.data' needs TensorFlow, which is not installed; pipeline='pydataset' "
            "reads the in-memory datasets (digits, Fashion-MNIST from its files) without it"
        )


def _in_memory(images, labels, pipeline, *, mean, std, batch_size, shuffle, augment, flip,
               seed, drop_remainder, workers):  # fmt: skip
    """Either pipeline over in-memory images (arguments checked by the caller)."""
    if pipeline == "pydataset":
        return ArrayBatches(
            images,
            labels,
            batch_size=batch_size,
            shuffle=shuffle,
            augment=augment,
            flip=flip,
            seed=seed,
            drop_remainder=drop_remainder,
            mean=mean,
            std=std,
            workers=workers,
        )
    ds = _planned_dataset(images, labels, shuffle=shuffle, augment=augment, flip=flip, seed=seed)
    return _finish(ds, mean, std, images.shape[1:], batch_size, drop_remainder)


def _tfds_pipeline(
    name, info, tfds_split, *, batch_size, augment, shuffle, data_dir, seed, drop_remainder,
    normalize, take,
):  # fmt: skip
    """The tf.data pipeline of a TFDS source (arguments checked by :func:`load`)."""
    import tensorflow as tf

    # A subset is taken in stored order, so TFDS must not shuffle its files under it.
    shuffle_files = shuffle and take is None
    ds, buffer_size = _tfds_source(
        name, tfds_split, shuffle=shuffle_files, data_dir=data_dir, seed=seed
    )
    if take is not None:
        ds, buffer_size = ds.take(take), min(buffer_size, take)
    if shuffle:
        ds = ds.shuffle(buffer_size, seed=seed, reshuffle_each_iteration=True)
    if augment:
        flip = _FLIP[name]
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda xy, s: (augment_image(xy[0], s, flip=flip), xy[1]),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    mean, std = (info.mean, info.std) if normalize else (None, None)
    return _finish(ds, mean, std, info.image_shape, batch_size, drop_remainder)


def _finish(ds, mean, std, shape, batch_size: int, drop_remainder: bool):
    """float32 images (normalised when ``mean`` is given), int32 labels, batched, prefetched."""
    import tensorflow as tf

    def finish(image, label):
        image = tf.ensure_shape(tf.cast(image, tf.float32), shape)
        if mean is not None:
            image = (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)
        return image, tf.cast(label, tf.int32)

    ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)
