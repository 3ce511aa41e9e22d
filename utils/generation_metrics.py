"""Generation metrics (FID, KID, Inception Score, precision/recall) through torch-fidelity, weights from local files.

Reference: torch-fidelity (Obukhov et al., https://github.com/toshas/torch-fidelity), whose InceptionV3 is the
TensorFlow graph of Heusel et al.'s TTUR FID code converted bit-exactly, so its FID/KID/IS equal the values
papers publish. This module only feeds it: it checks the weight file, names reference statistics so that a cache
is never reused for a folder that changed, and exposes torch-fidelity's own feature-space functions
(:func:`frechet_distance`, :func:`kernel_distance`, :func:`precision_recall`) for features of another network
(the user-generation report scores samples in its classifier's feature space).

* FID (Heusel et al. 2017) and KID (Binkowski et al. 2018, polynomial kernel, unbiased MMD over subsets) on the
  2048-d pool features; IS (Salimans et al. 2016) on the 1008 logits; precision/recall (Kynkaanniemi et al.
  2019, k = 3 neighbourhoods) on the pool features. Input 1 is the generated set, input 2 the real one.
* Weights: ``weights-inception-2015-12-05-6726825d.pth``, the file torch-fidelity downloads from
  :data:`INCEPTION_WEIGHTS_URL`; nothing is downloaded here, a missing file is a one-line error.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from utils.errors import CheckpointError, DataError, UserError

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
FEATURE_EXTRACTOR = "inception-v3-compat"
SAMPLE_EXTENSIONS = ("png", "jpg", "jpeg")  # what torch-fidelity reads from a folder
# torch-fidelity's registered data sets we accept as a reference (their torchvision layout under --datasets_root).
REFERENCE_DATASETS = {"cifar10": "cifar10-train", "cifar10-train": "cifar10-train", "cifar10-val": "cifar10-val"}
METRIC_KEYS = {
    "fid": ("frechet_inception_distance",),
    "kid": ("kernel_inception_distance_mean", "kernel_inception_distance_std"),
    "isc": ("inception_score_mean", "inception_score_std"),
    "prc": ("precision", "recall", "f_score"),
}


def require_torch_fidelity():
    try:
        import torch_fidelity
    except ImportError as error:
        raise UserError(
            "FID/KID/IS need the torch-fidelity package; install the evaluation extras with `pip install -r requirements-eval.txt`."
        ) from error
    return torch_fidelity


def check_inception_weights(path: str | Path | None, flag: str = "--inception_weights") -> Path:
    """The weight file as a Path once it exists and holds torch-fidelity's InceptionV3 (FeatureExtractorInceptionV3 keys).

    The file is read with ``weights_only=True`` here (torch-fidelity itself reads it without that guard), so an
    unsafe or wrong file is refused before torch-fidelity touches it.
    """
    hint = f"download {INCEPTION_WEIGHTS_FILE} from {INCEPTION_WEIGHTS_URL} on a machine with network and pass its path"
    if not path:
        raise UserError(f"{flag} is required: {hint}.")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path} does not exist: {hint}.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors, truncated files: all mean "not the expected weights"
        raise CheckpointError(f"{flag} {path} is not a readable PyTorch weight file ({type(error).__name__}): {hint}.") from error
    if not isinstance(state, dict) or "fc.weight" not in state or "Mixed_7c.branch_pool.conv.weight" not in state:
        raise CheckpointError(f"{flag} {path} does not hold torch-fidelity's InceptionV3 (keys Conv2d_1a_3x3.*, Mixed_*, fc.*): {hint}.")
    if tuple(state["fc.weight"].shape) != (1008, 2048):
        raise CheckpointError(
            f"{flag} {path}: fc.weight is {list(state['fc.weight'].shape)}, expected [1008, 2048] of the 2015-12-05 "
            f"TensorFlow Inception that FID uses (torchvision's ImageNet Inception has 1000 classes): {hint}."
        )
    return path


def image_files(folder: Path) -> list[Path]:
    """The files torch-fidelity reads from ``folder`` (png/jpg/jpeg, sub-folders included: a class-per-folder data
    set is one reference set), sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in SAMPLE_EXTENSIONS)


def folder_fingerprint(folder: Path) -> str:
    """A short hash of the folder's path and each file's name, size and modification time (a changed folder gets
    a new cache entry; reading every image to hash it would cost as much as the features)."""
    digest = hashlib.sha1(str(folder.resolve()).encode())
    for path in image_files(folder):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def describe_input(value: str, flag: str, datasets_root: str | None) -> tuple[str, int | None, str]:
    """``(torch-fidelity input, number of images or None, cache name)`` for a folder or a registered data set."""
    if value in REFERENCE_DATASETS:
        name = REFERENCE_DATASETS[value]
        root = Path(datasets_root or "data")
        if not (root / "cifar-10-batches-py").is_dir():
            raise DataError(
                f"{flag} {value} needs CIFAR-10 in torchvision's layout: {root}/cifar-10-batches-py/ is missing "
                f"(pass --datasets_root DIR that holds it; nothing is downloaded)."
            )
        return name, None, f"{name}-{hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:8]}"
    folder = Path(value)
    if not folder.is_dir():
        raise DataError(f"{flag} {folder} is not a folder of images nor one of {', '.join(REFERENCE_DATASETS)}.")
    count = len(image_files(folder))
    if count == 0:
        raise DataError(f"{flag} {folder} holds no .png/.jpg/.jpeg images.")
    return str(folder), count, f"folder-{folder.name}-{folder_fingerprint(folder)}"


def compute_generation_metrics(
    samples: str,
    reference: str | None,
    inception_weights: str | Path,
    metrics: tuple[str, ...] = ("fid", "kid", "isc", "prc"),
    batch_size: int = 64,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    datasets_root: str | None = None,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    prc_neighborhood: int = 3,
    isc_splits: int = 10,
    seed: int = 2020,
    verbose: bool = False,
) -> dict:
    """torch-fidelity's metrics of ``samples`` (a folder) against ``reference`` (a folder or a data set name).

    Returns ``{metric key: value}`` with torch-fidelity's keys, plus ``notes`` (subset sizes that were lowered to
    the number of images). Reference features are cached under ``cache_dir`` (keyed by the folder's fingerprint),
    so scoring many checkpoints against one data set extracts its features once.
    """
    torch_fidelity = require_torch_fidelity()
    unknown = set(metrics) - set(METRIC_KEYS)
    if unknown:
        raise UserError(f"Unknown metric(s) {sorted(unknown)}; choose from {', '.join(METRIC_KEYS)}.")
    weights = check_inception_weights(inception_weights)
    input1, count1, _ = describe_input(samples, "--samples", datasets_root)
    needs_reference = any(name in metrics for name in ("fid", "kid", "prc"))
    if needs_reference and reference is None:
        raise UserError("FID, KID and precision/recall need --reference (a folder of real images or cifar10).")
    notes = []
    kwargs = dict(
        input1=input1,
        cuda=str(device).startswith("cuda"),
        batch_size=batch_size,
        feature_extractor=FEATURE_EXTRACTOR,
        feature_extractor_weights_path=str(weights),
        isc="isc" in metrics,
        fid="fid" in metrics,
        kid="kid" in metrics,
        prc="prc" in metrics,
        isc_splits=isc_splits,
        kid_subsets=kid_subsets,
        prc_neighborhood=prc_neighborhood,
        rng_seed=seed,
        verbose=verbose,
        datasets_download=False,
        samples_shuffle=False,
        samples_find_deep=True,
        cache=cache_dir is not None,
        # No DataLoader worker processes on CPU (torch-fidelity otherwise starts 4): the feature extractor is the
        # bottleneck there, and workers only compete with it for the cores.
        save_cpu_ram=not str(device).startswith("cuda"),
    )
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        kwargs["cache_root"] = str(cache_dir)
    if datasets_root is not None:
        kwargs["datasets_root"] = datasets_root
    if needs_reference:
        input2, count2, cache_name = describe_input(reference, "--reference", datasets_root)
        kwargs.update(input2=input2, input2_cache_name=cache_name)
        smallest = min(n for n in (count1, count2) if n is not None)
        if "kid" in metrics and kid_subset_size > smallest:
            notes.append(f"KID subset size lowered from {kid_subset_size} to {smallest} (the smaller set)")
            kid_subset_size = smallest
        if "prc" in metrics and prc_neighborhood >= smallest:
            raise DataError(
                f"Precision/recall with k = {prc_neighborhood} needs more than {prc_neighborhood} images per set, "
                f"found {smallest}."
            )
    if "isc" in metrics and count1 is not None and count1 < isc_splits:
        notes.append(f"IS splits lowered from {isc_splits} to {count1} (one image per split at least)")
        kwargs["isc_splits"] = count1
    kwargs["kid_subset_size"] = kid_subset_size
    values = torch_fidelity.calculate_metrics(**kwargs)
    return {**{key: float(value) for key, value in values.items()}, "notes": notes}


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """FID's formula on any ``[N, D]`` features, by torch-fidelity's own functions (float64 statistics)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    require_torch_fidelity()
    stats = [fid_features_to_statistics(f.detach().cpu().double()) for f in (features_a, features_b)]
    return float(fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"])


def kernel_distance(
    features_a: torch.Tensor, features_b: torch.Tensor, subset_size: int = 1000, subsets: int = 100, seed: int = 2020
) -> tuple[float, float]:
    """KID (mean, std over subsets) on any ``[N, D]`` features by torch-fidelity; the subset size is capped at the
    smaller set."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    require_torch_fidelity()
    size = min(subset_size, len(features_a), len(features_b))
    out = kid_features_to_metric(
        features_a.detach().cpu().double(),
        features_b.detach().cpu().double(),
        kid_subsets=subsets,
        kid_subset_size=size,
        rng_seed=seed,
        verbose=False,
    )
    return float(out["kernel_inception_distance_mean"]), float(out["kernel_inception_distance_std"])


def precision_recall(generated: torch.Tensor, real: torch.Tensor, neighborhood: int = 3) -> tuple[float, float]:
    """Improved precision/recall (Kynkaanniemi et al. 2019) on any features by torch-fidelity."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    require_torch_fidelity()
    out = prc_features_to_metric(
        generated.detach().cpu().float(),
        real.detach().cpu().float(),
        prc_neighborhood=neighborhood,
        prc_batch_size=10000,
        save_cpu_ram=False,
        verbose=False,
    )
    return float(out["precision"]), float(out["recall"])


def mean_pairwise_distance(features: torch.Tensor) -> float:
    """Mean Euclidean distance over distinct pairs of ``[N, D]`` features (intra-set diversity); NaN below 2."""
    if len(features) < 2:
        return float("nan")
    distances = torch.cdist(features.double(), features.double())
    n = len(features)
    return float(distances.sum() / (n * (n - 1)))


def nearest_distances(queries: torch.Tensor, pool: torch.Tensor, exclude_self: bool = False) -> np.ndarray:
    """Distance from each query to its nearest neighbour in ``pool`` (``exclude_self`` when both are one set)."""
    distances = torch.cdist(queries.double(), pool.double())
    if exclude_self:
        distances.fill_diagonal_(float("inf"))
    return distances.min(dim=1).values.numpy()
