"""Drift of live photos: do the images people send still look like the training images?

The encoder's features, pooled over positions (one 1280-vector per image for
EfficientNet-Lite), are compared with the training images' pooled features:

- at training time, `DriftReference.fit` keeps a projection of the features to 32
  dimensions, a seeded sample of up to 500 projected training vectors (the reference
  sample), and a threshold for windows of `window` live images;
- while serving, `DriftMonitor` keeps the last `window` images' projected features, and
  `DriftReference.score` gives their drift score; `alarm(score)` is True above the threshold.

The statistic is the squared maximum mean discrepancy (MMD², unbiased estimate) with a
Gaussian kernel whose bandwidth is the median distance between reference vectors. MMD² is
zero only when the two distributions are equal (the Gaussian kernel is characteristic), so
one number catches any change of the features' joint distribution: a new kind of scene, a
colour cast, blur, a different camera. A per-dimension population stability index (PSI)
was the alternative: it needs bins, looks at each dimension alone (missing changes in how
they vary together) and needs a correction for testing many dimensions at once.

The threshold comes from a permutation test on the training features themselves: many
times, a random window of `window` training vectors is scored against the reference
sample without those vectors, and the threshold is the (1 - alpha) quantile of these
scores (alpha = 0.01: the 99th percentile). A window drawn from the training distribution
therefore raises a false alarm with probability about alpha, and an alarm means
"p < alpha" for that window size, and only for that one: a smaller window has a wider null
distribution, so `score` takes exactly `window` images. The score is about 0 without
drift and may be slightly negative (the estimate is unbiased); `p_value` gives the
permutation p-value of a score. Consecutive windows overlap, so a monitor checked after
every batch sees a chance alarm now and then: alert on an alarm that lasts.

The projection is a seeded Gaussian random projection, not a PCA: a PCA fitted on the
training features fits them better than new photos of the same kind, so training windows
look more alike than live ones and the permutation threshold comes out too low (seen with
300 Flickr8k training photos: the official test photos alarmed at p = 0.006 with a
32-dimension PCA, not with a random projection, whose permutation test is exact because it
does not depend on the data). In 32 dimensions it detects a stream of synthetic scenes, or
of blurred and colour-shifted photos, about as early as the full 1280 dimensions do.
What the pooled features hardly see: a photo negative (colours inverted) keeps their
distribution nearly as it was (inverted Flickr8k test photos score like the photos).

Why not a library: alibi-detect (MMDDrift), evidently and torchdrift implement such tests,
but the first two bring heavy dependencies into the serving image (TensorFlow or
scikit-learn, pandas, plotly, numba) and all three need scipy, which the image does not
have; torchdrift is no longer maintained. The statistic is a few lines of numpy, tested
in tests/unit/features/test_drift.py and on real photos in tests/integration/test_drift_photos.py.

The reference is one small file in the model package (`drift.npz`, about 200 KB), written
byte for byte the same for the same features and seed. `summary` gives the figures of a set of
images against it, for a report (the retrain flow's decision, for one).
"""

from __future__ import annotations

import io
import os
import threading
import zipfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DRIFT_FILE = "drift.npz"
FORMAT_VERSION = 1
_ARRAYS = ("mean", "components", "reference", "null")
_SCALARS = ("format", "gamma", "threshold", "window", "alpha", "images", "encoder")


class DriftReferenceError(ValueError):
    """A drift reference file that is present but cannot be used (says which and why)."""


def pool(features) -> np.ndarray:
    """Encoder features (B, N, C) to pooled (B, C) means over positions, as float64.

    (B, C) input is taken as already pooled; numpy arrays and torch tensors are accepted.
    """
    array = _pooled(features)
    if not np.isfinite(array).all():
        raise ValueError("features hold NaN or infinite values")
    return array


def pool_finite(features) -> np.ndarray:
    """`pool` of the images whose features are all finite: a store may hold a few broken rows,
    which training skips too, and a reference must not be built from them."""
    array = _pooled(features)
    return array[np.isfinite(array).all(axis=1)]


def _pooled(features) -> np.ndarray:
    if hasattr(features, "detach"):  # a torch tensor (torch itself is not imported here)
        features = features.detach().float().cpu().numpy()
    array = np.asarray(features)
    if array.ndim == 3:
        # Averaged in float64 as it is read: a memory-mapped float16 store is never copied whole.
        array = array.mean(axis=1, dtype=np.float64)
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"features must be (images, channels) or (images, positions, channels), not {array.shape}")
    return array


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # einsum, not a @ b.T: BLAS threads cost far more than they save on these small matrices
    # when the cores are busy (13 times slower seen with two threads on a loaded machine).
    products = np.einsum("ik,jk->ij", a, b)
    squared = (a * a).sum(axis=1)[:, None] + (b * b).sum(axis=1)[None, :] - 2.0 * products
    return np.maximum(squared, 0.0)


def _project(vectors: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    centred = vectors - mean.astype(np.float64)
    return np.einsum("ic,ck->ik", centred, components.astype(np.float64))  # no BLAS threads, as above


def _kernel(a: np.ndarray, b: np.ndarray, gamma: float) -> np.ndarray:
    return np.exp(-gamma * _squared_distances(a, b))


def _within_mean(kernel: np.ndarray) -> float:
    """Mean of a square kernel matrix off its diagonal (k(x, x) = 1 terms bias the estimate)."""
    count = len(kernel)
    return float((kernel.sum() - np.trace(kernel)) / (count * (count - 1)))


def median_gamma(sample: np.ndarray) -> float:
    """The Gaussian kernel exp(-gamma d²) whose bandwidth is the median pairwise distance."""
    squared = _squared_distances(sample, sample)[np.triu_indices(len(sample), k=1)]
    median = float(np.median(squared))
    return 1.0 / (2.0 * median) if median > 0 else 1.0


def _mmd2(x: np.ndarray, reference: np.ndarray, gamma: float, reference_term: float) -> float:
    """Unbiased MMD² of x against the reference, given the reference's own within-mean."""
    return _within_mean(_kernel(x, x, gamma)) + reference_term - 2.0 * float(_kernel(x, reference, gamma).mean())


def mmd2(x: np.ndarray, y: np.ndarray, gamma: float | None = None) -> float:
    """Unbiased MMD² between two samples (rows); gamma defaults to the median heuristic on y."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2 or len(y) < 2:
        raise ValueError("MMD² needs at least two vectors on each side")
    gamma = median_gamma(y) if gamma is None else gamma
    return _mmd2(x, y, gamma, _within_mean(_kernel(y, y, gamma)))


def _projection(vectors: np.ndarray, dims: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(mean, components (C, k)) as float32 (what is stored): a Gaussian random projection,
    which keeps distances between vectors to within about 1/sqrt(k) of their length."""
    k = min(dims, vectors.shape[1])
    components = rng.standard_normal((vectors.shape[1], k)) / np.sqrt(k)
    return vectors.mean(axis=0).astype(np.float32), components.astype(np.float32)


def _null_scores(
    projected: np.ndarray, chosen: np.ndarray, window: int, gamma: float, permutations: int, rng: np.random.Generator
) -> np.ndarray:
    """Scores of random training windows against the reference sample minus those windows' vectors."""
    reference = projected[chosen]
    within = _kernel(reference, reference, gamma)
    np.fill_diagonal(within, 0.0)
    row_sums = within.sum(axis=1)
    total = float(row_sums.sum())
    slot = np.full(len(projected), -1)
    slot[chosen] = np.arange(len(chosen))
    scores = np.empty(permutations)
    for n in range(permutations):
        drawn = rng.choice(len(projected), size=window, replace=False)
        dropped = slot[drawn][slot[drawn] >= 0]
        keep = np.ones(len(chosen), dtype=bool)
        keep[dropped] = False
        # The kept vectors' within-sum, from the full one: the dropped rows and columns come out.
        kept_sum = total - 2.0 * float(row_sums[dropped].sum()) + float(within[np.ix_(dropped, dropped)].sum())
        count = int(keep.sum())
        scores[n] = _mmd2(projected[drawn], reference[keep], gamma, kept_sum / (count * (count - 1)))
    return np.sort(scores)


@dataclass(eq=False)
class DriftReference:
    """What live images are compared with: see the module docstring."""

    mean: np.ndarray  # (C,) float32: the training vectors' mean
    components: np.ndarray  # (C, k) float32: the random projection
    reference: np.ndarray  # (m, k) float32: projected training vectors
    null: np.ndarray  # (permutations,) sorted scores of training windows
    gamma: float  # Gaussian kernel exp(-gamma d²)
    threshold: float  # alarm above this score
    window: int  # images per scored window; the threshold holds for this size only
    alpha: float
    images: int  # training images the reference was fitted on
    encoder: str = ""  # the feature key of the encoder the features came from ("" unknown)
    _reference_term: float = field(default=0.0, init=False, repr=False)

    def __post_init__(self) -> None:
        reference = self.reference.astype(np.float64)
        self._reference_term = _within_mean(_kernel(reference, reference, self.gamma))

    @classmethod
    def fit(
        cls,
        pooled,
        window: int,
        seed: int = 0,
        dims: int = 32,
        reference_size: int = 500,
        permutations: int = 500,
        alpha: float = 0.01,
        encoder: str = "",
    ) -> "DriftReference":
        """The reference of the training images' pooled features (T, C); T must be at least 2 * window."""
        vectors = pool(pooled)
        if window < 2 or len(vectors) < 2 * window:
            raise ValueError(
                f"a drift reference for windows of {window} needs at least {2 * window} training images "
                f"(and a window of 2 or more), not {len(vectors)}"
            )
        if not 0 < alpha < 1 or permutations < 1:
            raise ValueError(f"alpha must lie in (0, 1) and permutations be positive, not {alpha}, {permutations}")
        rng = np.random.default_rng(seed)
        mean, components = _projection(vectors, dims, rng)
        projected = _project(vectors, mean, components)
        chosen = np.sort(rng.choice(len(vectors), size=min(reference_size, len(vectors)), replace=False))
        reference = projected[chosen].astype(np.float32)
        # Everything below uses the stored float32 values, so a loaded reference scores the same.
        projected[chosen] = reference
        gamma = median_gamma(reference.astype(np.float64))
        null = _null_scores(projected, chosen, window, gamma, permutations, rng)
        threshold = float(np.quantile(null, 1.0 - alpha))
        return cls(mean, components, reference, null, gamma, threshold, window, alpha, len(vectors), encoder)

    @property
    def dim(self) -> int:
        """Channels of the pooled features this reference takes."""
        return len(self.mean)

    def project(self, pooled) -> np.ndarray:
        """Pooled features (B, C) (or unpooled (B, N, C)) to the reduced (B, k) vectors."""
        vectors = pool(pooled)
        if vectors.shape[1] != self.dim:
            raise ValueError(f"features have {vectors.shape[1]} channels; this drift reference takes {self.dim}")
        return _project(vectors, self.mean, self.components)

    def score(self, pooled_window) -> float:
        """The drift score (MMD²) of exactly `window` images' pooled features."""
        return self.score_projected(self.project(pooled_window))

    def score_projected(self, projected: np.ndarray) -> float:
        """The drift score of `window` already projected vectors (see `project`)."""
        if len(projected) != self.window:
            raise ValueError(f"the threshold holds for windows of {self.window} images, not {len(projected)}")
        reference = self.reference.astype(np.float64)
        return _mmd2(np.asarray(projected, dtype=np.float64), reference, self.gamma, self._reference_term)

    def alarm(self, score: float) -> bool:
        """True when the score is above the threshold: drift, at significance level alpha."""
        return score > self.threshold

    def p_value(self, score: float) -> float:
        """The permutation p-value of a score: the share of training windows scoring as high."""
        higher = len(self.null) - int(np.searchsorted(self.null, score, side="left"))
        return (1 + higher) / (1 + len(self.null))

    def save(self, folder: str | Path) -> Path:
        """Write `folder`/drift.npz (atomically; the same reference gives the same bytes)."""
        path = Path(folder) / DRIFT_FILE
        values = {name: getattr(self, name) for name in _ARRAYS}
        values.update(format=FORMAT_VERSION, **{name: getattr(self, name) for name in _SCALARS[1:]})
        tmp = path.with_name(path.name + ".tmp")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name, value in values.items():
                # A fixed date, so the file's bytes (and a package digest) depend on the data only.
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                buffer = io.BytesIO()
                np.lib.format.write_array(buffer, np.asarray(value), allow_pickle=False)
                archive.writestr(info, buffer.getvalue())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "DriftReference | None":
        """The reference in `folder`/drift.npz; None when there is none (a package made before
        drift references existed: no drift monitoring), DriftReferenceError when it is unusable."""
        path = Path(folder) / DRIFT_FILE
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as archive:
                values = {name: archive[name] for name in _ARRAYS + _SCALARS}
            version = int(values["format"])
        except (OSError, ValueError, TypeError, KeyError, zipfile.BadZipFile, EOFError) as error:
            raise DriftReferenceError(f"{path} cannot be read: {error}") from None
        if version != FORMAT_VERSION:
            raise DriftReferenceError(f"{path} has format {version}, this code reads {FORMAT_VERSION}")
        try:
            return cls._checked(path, values)
        except (TypeError, ValueError) as error:  # scalars of the wrong shape or type
            raise DriftReferenceError(f"{path} is inconsistent: {error}") from None

    @classmethod
    def _checked(cls, path: Path, values: dict) -> "DriftReference":
        mean, components, reference, null = (values[name] for name in _ARRAYS)
        shapes_fit = (
            mean.ndim == 1
            and components.ndim == 2
            and components.shape[0] == len(mean)
            and reference.ndim == 2
            and reference.shape[1] == components.shape[1]
            and len(reference) >= 2
            and null.ndim == 1
            and len(null) >= 1
        )
        finite = all(np.isfinite(values[name]).all() for name in _ARRAYS + ("gamma", "threshold"))
        if not shapes_fit or not finite or int(values["window"]) < 2:
            raise DriftReferenceError(
                f"{path} is inconsistent: arrays of shapes "
                f"{[values[name].shape for name in _ARRAYS]}, a window of {values['window']} or non-finite values"
            )
        return cls(
            mean,
            components,
            reference,
            null,
            float(values["gamma"]),
            float(values["threshold"]),
            int(values["window"]),
            float(values["alpha"]),
            int(values["images"]),
            str(values["encoder"]),
        )


class DriftMonitor:
    """The last `window` live images' projected features, and their drift score (thread-safe).

    `add` after each batch of requests, `score` when wanted: together a few milliseconds
    for a window of 100 against 500 reference vectors, in numpy on one core.
    """

    def __init__(self, reference: DriftReference, window: int | None = None):
        window = reference.window if window is None else window
        if window != reference.window:
            raise ValueError(
                f"the drift reference's threshold holds for windows of {reference.window} images, not {window}"
            )
        self.reference = reference
        self.window = window
        self.seen = 0  # images added since the monitor started
        self._recent: deque[np.ndarray] = deque(maxlen=window)
        self._lock = threading.Lock()

    def add(self, pooled_batch) -> None:
        """Add a batch of live images' features, pooled (B, C) or not (B, N, C)."""
        projected = self.reference.project(pooled_batch)
        with self._lock:
            self._recent.extend(projected)
            self.seen += len(projected)

    def __len__(self) -> int:
        with self._lock:
            return len(self._recent)

    def recent(self) -> np.ndarray:
        """A copy of the last (up to `window`) images' projected features, oldest first."""
        with self._lock:
            if not self._recent:
                return np.empty((0, self.reference.components.shape[1]))
            return np.stack(self._recent)

    def score(self) -> float | None:
        """The drift score of the last `window` images; None until that many were added."""
        recent = self.recent()
        if len(recent) < self.window:
            return None
        return self.reference.score_projected(recent)


def summary(reference: DriftReference | None, pooled) -> dict[str, Any]:
    """The drift figures of a set of images (their features, pooled or not, oldest first) against
    a package's reference, as a report shows them.

    `score`, `p_value` and `alarm` are those of the last `window` images, as the service's gauges
    would show them after that traffic; `windows` counts the complete windows the images make
    from the newest back (no image in two of them), `alarmed_windows` those that alarm (about
    alpha of them by chance without drift). With no reference, or fewer images than a window,
    the figures are None and `reason` says why.
    """
    images = 0 if pooled is None else len(pooled)
    figures: dict[str, Any] = {
        "images": images,
        "window": None,
        "threshold": None,
        "alpha": None,
        "score": None,
        "p_value": None,
        "alarm": None,
        "windows": 0,
        "alarmed_windows": 0,
        "reason": "",
    }
    if reference is None:
        return {**figures, "reason": "the package has no drift reference (drift.npz)"}
    window = reference.window
    figures.update(window=window, threshold=reference.threshold, alpha=reference.alpha)
    if images < window:
        return {**figures, "reason": f"{images} images, fewer than a window of {window}"}
    projected = reference.project(pooled)
    scores = [reference.score_projected(projected[end - window : end]) for end in range(images, window - 1, -window)]
    return {
        **figures,
        "score": scores[0],
        "p_value": reference.p_value(scores[0]),
        "alarm": reference.alarm(scores[0]),
        "windows": len(scores),
        "alarmed_windows": sum(reference.alarm(score) for score in scores),
    }
