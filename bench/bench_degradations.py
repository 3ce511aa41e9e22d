"""SeeSR's training data: samples per second of the Real-ESRGAN degradation, per sample against batched.

    python bench/bench_degradations.py                         # 512 px, batch 8, CPU (and CUDA when present)
    python bench/bench_degradations.py --size 128 --batch 4 --rounds 2    # the smoke setting

Per sample: what a data-loader worker runs for one item of ``HRFolderDegradedDataset`` (``--degradation seesr``):
USM sharpening, :func:`data.degradations.degrade` (PIL JPEG) and the bicubic ControlNet input, one image at a time
on the CPU. Batched: what the
training loop runs with ``--degradation_device cuda`` (:func:`data.degradations_batched.degrade_training_batch`):
the same drawn parameters, USM and the degradation on the whole batch (kornia filters, the torch JPEG codec), on
the CPU and, where there is one, on the GPU. Both paths' times include drawing the parameters (kernels: a few ms);
every round draws new ones, and the paths run interleaved. Samples/s over all rounds, the ratio batched/per-sample
(the issue's target: at least 5x on CPU, at least 8 samples/s at 512 px on one GPU). Photographs from
scikit-image, cropped. Prints a Markdown table; nothing here is a test.

``--baseline_checkout DIR`` adds the per-sample path of another checkout of this repository (its
``data/degradations.py`` ``usm_sharpen``/``degrade``/``bicubic_upsample``, same seeds), e.g. the code before the
batched degradations::

    git worktree add /tmp/deg_before 45280b3
    OMP_NUM_THREADS=1 python bench/bench_degradations.py --baseline_checkout /tmp/deg_before
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import import_from_checkout, synchronize  # noqa: E402
from data.degradations import (  # noqa: E402
    DegradationConfig,
    bicubic_upsample,
    degrade,
    sample_degradation,
    usm_sharpen,
)
from data.degradations_batched import degrade_training_batch  # noqa: E402


def photo_crops(count: int, size: int, seed: int) -> torch.Tensor:
    """``[count, 3, size, size]`` random crops of scikit-image's colour photographs (resized up when too small)."""
    from skimage import data as images

    photos = [torch.from_numpy(np.ascontiguousarray(getattr(images, name)()[..., :3])).permute(2, 0, 1).float() / 255
              for name in ("astronaut", "coffee", "chelsea", "rocket")]
    rng = np.random.default_rng(seed)
    crops = []
    for index in range(count):
        photo = photos[index % len(photos)]
        if min(photo.shape[-2:]) < size:
            photo = torch.nn.functional.interpolate(photo[None], size=(size, size), mode="bicubic")[0].clamp(0, 1)
        top = int(rng.integers(0, photo.shape[1] - size + 1))
        left = int(rng.integers(0, photo.shape[2] - size + 1))
        crops.append(photo[:, top : top + size, left : left + size])
    return torch.stack(crops)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="HR crop size (SeeSR trains at 512)")
    parser.add_argument("--batch", type=int, default=8, help="images per batch of the batched path")
    parser.add_argument("--rounds", type=int, default=3, help="timed batches per path (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (a data-loader worker has one)")
    parser.add_argument("--devices", nargs="+", default=None, help="devices of the batched path (default cpu [cuda])")
    parser.add_argument("--baseline_checkout", default=None,
                        help="another checkout of this repository whose per-sample path to time as well (e.g. a worktree of 45280b3)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = DegradationConfig.seesr()
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    hr = photo_crops(args.batch, args.size, seed=0)

    def draw(round_index):
        rngs = [np.random.default_rng([round_index, i]) for i in range(args.batch)]
        return rngs, [sample_degradation(config, np.random.default_rng([round_index, i])) for i in range(args.batch)]

    def per_sample(round_index):
        rngs, _ = draw(round_index)
        for image, rng in zip(hr, rngs, strict=True):
            bicubic_upsample(degrade(usm_sharpen(image), config, rng), image.shape[-2:])  # + the ControlNet input

    def batched(round_index, device):
        _, params = draw(round_index)
        stacked = torch.utils.data.default_collate([p.to_tensors() for p in params])
        batch = {"hr": hr * 2 - 1, "degradation": stacked}
        degrade_training_batch(batch, config, torch.device(device))
        synchronize(torch.device(device))

    paths = {}
    if args.baseline_checkout:
        if not (Path(args.baseline_checkout) / "data" / "degradations.py").is_file():
            sys.exit(f"error: --baseline_checkout {args.baseline_checkout} has no data/degradations.py; "
                     "pass a checkout of this repository.")
        (baseline,) = import_from_checkout(args.baseline_checkout, "data.degradations")
        baseline_config = baseline.DegradationConfig.seesr()

        def per_sample_baseline(round_index):
            rngs, _ = draw(round_index)
            for image, rng in zip(hr, rngs, strict=True):
                baseline.bicubic_upsample(baseline.degrade(baseline.usm_sharpen(image), baseline_config, rng), image.shape[-2:])

        paths[f"per sample, {Path(args.baseline_checkout).name} (CPU, PIL JPEG)"] = per_sample_baseline
    paths["per sample (CPU, PIL JPEG)"] = per_sample
    for device in devices:
        paths[f"batched ({device})"] = lambda r, d=device: batched(r, d)
    seconds = dict.fromkeys(paths, 0.0)
    for function in paths.values():  # warm-up: kornia imports, kernels, cuDNN
        function(10**6)
    for round_index in range(args.rounds):
        for name, function in paths.items():
            started = time.perf_counter()
            function(round_index)
            seconds[name] += time.perf_counter() - started
    images = args.rounds * args.batch
    base = images / seconds["per sample (CPU, PIL JPEG)"]
    print(f"\nSeeSR degradation (--degradation seesr), {args.size} px, batch {args.batch}, {args.rounds} rounds, "
          f"{args.threads} CPU thread(s)\n")
    print("| path | samples/s | x per sample |")
    print("|---|---|---|")
    for name, total in seconds.items():
        rate = images / total
        print(f"| {name} | {rate:.2f} | {rate / base:.2f} |")


if __name__ == "__main__":
    main()
