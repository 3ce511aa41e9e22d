"""Does a generated spectrogram look like the requested person? A per-user classifier and its feature space.

Generated micro-Doppler spectrograms have no Inception-like reference network, so the evaluation trains one: a
torchvision ResNet-18 (He et al. 2016; from scratch, or from local ImageNet weights) that identifies the user from
the **training split** of the users' ``ID_n`` folders only. Then, on generated samples (the protocol of
classification-accuracy scores for conditional generators, e.g. Ravuri and Vinyals 2019, "CAS"):

* accuracy for the requested user and the confusion matrix (requested x predicted);
* per-user FID and KID in the classifier's 512-d penultimate features against held-out real images, computed by
  torch-fidelity's own functions (:mod:`utils.generation_metrics`);
* intra-user diversity: mean pairwise feature distance of generated samples, next to the same for real ones;
* memorisation: each sample's nearest training image (same user, feature distance) against the real-vs-real
  baseline, the nearest training image of each held-out real image (Meehan et al. 2020 compare these two
  distributions); a sample closer than the 5th percentile of the real baseline counts as "suspiciously close".

The VA-VAE reconstruction report (encode-decode of held-out images: PSNR/SSIM/LPIPS and the classifier's accuracy on
reconstructions) is the ceiling generation through that VAE can reach.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from utils.errors import CheckpointError, UserError

RESNET18_FILE = "resnet18-f37072fd.pth"  # torchvision's ImageNet ResNet-18 (IMAGENET1K_V1)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MEMORISATION_PERCENTILE = 5.0


def build_user_classifier(num_users: int, imagenet_weights: str | None = None) -> nn.Module:
    """ResNet-18 with ``num_users`` outputs (class k = user k + 1); ``imagenet_weights`` initialises all but ``fc``."""
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_users)
    if imagenet_weights:
        from pathlib import Path

        from utils.checkpoint import load_state_file

        if not Path(imagenet_weights).is_file():
            raise UserError(f"--classifier_weights {imagenet_weights} does not exist: torchvision's ImageNet ResNet-18 is "
                            f"{RESNET18_FILE} (https://download.pytorch.org/models/{RESNET18_FILE}); pass it or drop the flag "
                            "to train from scratch.")
        state = {k: v for k, v in load_state_file(imagenet_weights).items() if not k.startswith("fc.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) != {"fc.weight", "fc.bias"}:
            raise CheckpointError(f"--classifier_weights {imagenet_weights} is not a torchvision ResNet-18 state dict "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]}); expected {RESNET18_FILE}.")
    return model


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> ImageNet-normalised float."""
    mean = images.new_tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def train_user_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epochs: int, batch_size: int,
                          learning_rate: float, seed: int, device: torch.device, log=print) -> nn.Module:
    """Plain supervised training (AdamW, cosine schedule, no flips: time reversal is not label-safe for gait)."""
    generator = torch.Generator().manual_seed(seed)
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.05)
    steps = epochs * max(1, -(-len(images) // batch_size))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        total, correct = 0.0, 0
        for start in range(0, len(images), batch_size):
            index = order[start : start + batch_size]
            x, y = normalise(images[index]).to(device), labels[index].to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(index)
            correct += int((logits.argmax(1) == y).sum())
        log(f"classifier epoch {epoch + 1}/{epochs}: loss {total / len(images):.4f}, train accuracy {correct / len(images):.3f}")
    return model.eval()


@torch.no_grad()
def classify(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(predicted class (N,), penultimate features (N, 512))`` of uint8 images."""
    model.eval()
    features = []
    hook = model.avgpool.register_forward_hook(lambda module, args, output: features.append(output.flatten(1).cpu()))
    try:
        predictions = [model(normalise(images[start : start + batch_size]).to(device)).argmax(1).cpu()
                       for start in range(0, len(images), batch_size)]
    finally:
        hook.remove()
    return torch.cat(predictions), torch.cat(features).double()


def confusion_matrix(requested: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> np.ndarray:
    """Counts, rows = requested class, columns = predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (requested.numpy(), predicted.numpy()), 1)
    return matrix


def save_confusion_png(matrix: np.ndarray, user_ids: list[int], path, title: str) -> None:
    """Row-normalised confusion matrix with counts, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = matrix.sum(1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=np.float64), where=rows > 0)
    size = max(4.0, 0.45 * len(user_ids) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ticks = [str(u) for u in user_ids]
    ax.set_xticks(range(len(ticks)), ticks, fontsize=7)
    ax.set_yticks(range(len(ticks)), ticks, fontsize=7)
    ax.set_xlabel("predicted user")
    ax.set_ylabel("requested user")
    ax.set_title(title, fontsize=9)
    if len(user_ids) <= 20:
        for i in range(len(ticks)):
            for j in range(len(ticks)):
                if matrix[i, j]:
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7, color="white" if share[i, j] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass
class UserScores:
    """The per-user numbers of one generated set."""

    user: int
    num_generated: int
    accuracy: float
    fid: float | None = None
    kid: float | None = None
    diversity_generated: float | None = None
    diversity_real: float | None = None
    nn_train_distance_generated: float | None = None
    nn_train_distance_real: float | None = None
    suspiciously_close: float | None = None
    notes: list[str] = field(default_factory=list)


def score_user(user: int, generated: torch.Tensor, predicted: torch.Tensor, label: int, real_val: torch.Tensor,
               real_train: torch.Tensor, kid_subset_size: int = 100) -> UserScores:
    """Per-user accuracy, FID/KID against held-out real features, diversity and memorisation (features ``[N, D]``)."""
    from utils.generation_metrics import frechet_distance, kernel_distance, mean_pairwise_distance, nearest_distances

    scores = UserScores(user, len(generated), float((predicted == label).double().mean()) if len(predicted) else float("nan"))
    if len(generated) >= 2 and len(real_val) >= 2:
        scores.fid = frechet_distance(generated, real_val)
        scores.kid = kernel_distance(generated, real_val, subset_size=kid_subset_size, subsets=100)[0]
    else:
        scores.notes.append("FID/KID need two generated and two held-out real images")
    scores.diversity_generated = mean_pairwise_distance(generated)
    scores.diversity_real = mean_pairwise_distance(real_val)
    if len(real_train) and len(generated):
        generated_nn = nearest_distances(generated, real_train)
        scores.nn_train_distance_generated = float(np.median(generated_nn))
        if len(real_val):
            real_nn = nearest_distances(real_val, real_train)
            scores.nn_train_distance_real = float(np.median(real_nn))
            threshold = np.percentile(real_nn, MEMORISATION_PERCENTILE)
            scores.suspiciously_close = float((generated_nn <= threshold).mean())
    return scores
