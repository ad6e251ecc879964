"""Image classification with on-the-fly augmentation: random crop and flip in a transform, a small CNN.

Offline it builds synthetic 40x40 RGB images in code (3 classes: horizontal stripes, vertical stripes, a bright
square) and trains a small CNN on random 32x32 crops. The transform receives a numpy Generator seeded from
(seed, epoch, batch position), so the augmentation is reproducible and survives a resume. Online, name a Hub
image dataset with "image"/"img" and "label" columns:

    python examples/image_classification.py --max-steps 100
    python examples/image_classification.py --dataset uoft-cs/cifar10 --max-steps 500
"""

from __future__ import annotations

import argparse

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import hf_loop as hl

SIZE, CROP = 40, 32


def synthetic_images(n: int, seed: int = 0) -> datasets.Dataset:
    """Noisy images whose class is a pattern: 0 horizontal stripes, 1 vertical stripes, 2 a bright square."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    images = rng.integers(0, 90, (n, SIZE, SIZE, 3)).astype(np.uint8)
    period = rng.integers(4, 9, n)
    for i, (label, p) in enumerate(zip(labels, period)):
        if label == 0:
            images[i, (np.arange(SIZE) // (p // 2)) % 2 == 0] += 120
        elif label == 1:
            images[i, :, (np.arange(SIZE) // (p // 2)) % 2 == 0] += 120
        else:
            y, x = rng.integers(0, SIZE - 14, 2)
            images[i, y : y + 14, x : x + 14] += 150
    # Raw bytes keep the example dependency-free and fast to read; Hub datasets bring PIL images instead.
    return datasets.Dataset.from_dict({"image": [image.tobytes() for image in images], "label": labels})


def as_arrays(images: list) -> np.ndarray:
    """A batch of images (raw SIZE x SIZE x 3 bytes, or PIL images from a Hub dataset) as uint8 NHWC."""
    arrays = [
        np.frombuffer(image, np.uint8).reshape(SIZE, SIZE, 3)
        if isinstance(image, bytes)
        else np.asarray(image)
        for image in images
    ]
    batch = np.stack(arrays)
    return np.repeat(batch[..., None], 3, axis=-1) if batch.ndim == 3 else batch[..., :3]  # grayscale -> RGB


def augment(batch, rng: np.random.Generator):
    """Random crop to CROP x CROP and random horizontal flip, per image, as float CHW in [0, 1]."""
    images = as_arrays(batch["image"])
    n, h, w = images.shape[:3]
    ys, xs = rng.integers(0, h - CROP + 1, n), rng.integers(0, w - CROP + 1, n)
    flips = rng.random(n) < 0.5
    out = np.empty((n, 3, CROP, CROP), dtype=np.float32)
    for i in range(n):
        crop = images[i, ys[i] : ys[i] + CROP, xs[i] : xs[i] + CROP]
        out[i] = (crop[:, ::-1] if flips[i] else crop).transpose(2, 0, 1) / 255.0
    return {"pixel_values": out, "label": batch["label"]}


def center_crop(batch):
    """Evaluation: the same preprocessing without randomness."""
    images = as_arrays(batch["image"])
    top, left = (images.shape[1] - CROP) // 2, (images.shape[2] - CROP) // 2
    crops = images[:, top : top + CROP, left : left + CROP].transpose(0, 3, 1, 2)
    return {"pixel_values": crops.astype(np.float32) / 255.0, "label": batch["label"]}


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(64, num_classes)

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        logits = self.head(self.features(pixel_values).flatten(1))
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dataset", help="Hub id or local path with image and label columns (default: synthetic)"
    )
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0)
    args = parser.parse_args(argv)

    if args.dataset is None:
        ds = synthetic_images(1200)
    else:
        ds = hl.load(args.dataset, split="train")
        if "img" in ds.column_names:
            ds = ds.rename_column("img", "image")
    parts = ds.train_test_split(test_size=0.15, seed=0)
    num_classes = int(max(parts["train"]["label"])) + 1

    # The transform runs once per batch; its second argument is the seeded Generator for the augmentation.
    train = hl.MapDataset(parts["train"], transform=augment)
    val = hl.MapDataset(parts["test"], transform=center_crop)
    train_loader = hl.make_loader(train, batch_size=args.batch_size, num_workers=args.num_workers, seed=0)
    val_loader = hl.make_loader(val, batch_size=128, sampler="sequential")

    model = SmallCNN(num_classes)
    print(hl.count_parameters(model))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    config = hl.TrainConfig(max_steps=args.max_steps, log_every=max(1, args.max_steps // 5), progress=False)
    result = hl.train(
        model,
        train_loader,
        optimizer,
        config,
        on_log=lambda r: print(f"step {r['step']}: loss {r['loss']:.4f}") if "loss" in r else None,
    )

    def accuracy(predictions, targets):
        return (predictions == targets).float().mean().item()

    metrics = hl.evaluate(model, val_loader, metrics={"accuracy": accuracy})
    print(
        f"{result.steps} steps, {result.samples_per_s:.0f} images/s; "
        f"eval accuracy {metrics['accuracy']:.3f} on {int(metrics['examples'])} images (chance 1/{num_classes})"
    )


if __name__ == "__main__":
    main()
