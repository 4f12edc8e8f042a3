"""Train the domain classifiers whose features ``ddpm eval`` uses, and ship their weights.

    python scripts/train_classifiers.py [--data digits mnist fashion-mnist] [--out src/ddpm/weights]

One small CNN (``ddpm.nets.Classifier``) per data set, trained on its train split with a fixed seed
(AdamW, one-cycle learning rate, light random shifts), evaluated on its test split. Writes
``classifier_<data>.safetensors`` (float32 weights, no code) and adds an entry to ``classifiers.json``
(architecture, seed, epochs, test accuracy, SHA-256 of the weights). Prints the test accuracies.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

os.environ.setdefault(
    "OMP_WAIT_POLICY", "PASSIVE"
)  # see CPU-PERFORMANCE.md: busy machines stall otherwise

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save  # noqa: E402

from ddpm.checkpoint import atomic_write_bytes  # noqa: E402
from ddpm.data import load_dataset  # noqa: E402
from ddpm.nets.classifier import Classifier  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEED = 0
# Epochs per data set: enough for ~99% (MNIST) / ~91% (Fashion-MNIST) in about a CPU minute each.
EPOCHS = {"digits": 60, "mnist": 3, "fashion-mnist": 4}
BATCH = 128
LR = 3e-3


def shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to max_shift pixels (background -1 fills the gap)."""
    if max_shift == 0:
        return x
    padded = F.pad(x, [max_shift] * 4, value=-1.0)
    h, w = x.shape[-2:]
    out = torch.empty_like(x)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(x), 2), generator=generator)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy : dy + h, dx : dx + w]
    return out


@torch.no_grad()
def accuracy(net: Classifier, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    correct = sum(
        int((net(xb).argmax(1) == yb).sum())
        for xb, yb in zip(x.split(1000), y.split(1000), strict=True)
    )
    return correct / len(y)


def train_one(name: str, epochs: int) -> tuple[Classifier, dict]:
    train, test = load_dataset(name, split="train"), load_dataset(name, split="test")
    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)
    net = Classifier(in_channels=train.x.shape[1], num_classes=train.num_classes)
    steps = epochs * -(-len(train) // BATCH)
    opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps)
    max_shift = 1 if train.x.shape[-1] <= 8 else 2
    start = time.monotonic()
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(len(train), generator=g)
        for idx in perm.split(BATCH):
            loss = F.cross_entropy(net(shift(train.x[idx], max_shift, g)), train.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(f"{name}: epoch {epoch + 1}/{epochs}, loss {loss.item():.4f}", flush=True)
    seconds = time.monotonic() - start
    acc = accuracy(net, test.x, test.y)
    info = {
        "config": net.config,
        "image_size": int(train.x.shape[-1]),
        "seed": SEED,
        "epochs": epochs,
        "batch_size": BATCH,
        "lr": LR,
        "train_images": len(train),
        "test_images": len(test),
        "test_accuracy": acc,
        "train_seconds": round(seconds, 1),
        "torch": torch.__version__,
    }
    return net.eval(), info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=list(EPOCHS), choices=list(EPOCHS))
    parser.add_argument("--out", type=Path, default=ROOT / "src" / "ddpm" / "weights")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    index_path = args.out / "classifiers.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    for name in args.data:
        net, info = train_one(name, EPOCHS[name])
        blob = save({k: v.contiguous() for k, v in net.state_dict().items()})
        atomic_write_bytes(args.out / f"classifier_{name}.safetensors", blob)
        info["sha256"] = hashlib.sha256(blob).hexdigest()
        index[name] = info
        atomic_write_bytes(index_path, (json.dumps(index, indent=2) + "\n").encode())
        print(
            f"{name}: test accuracy {info['test_accuracy']:.4f} on {info['test_images']} images "
            f"({info['train_seconds']:.0f} s of training, {len(blob) / 1e6:.2f} MB)",
            flush=True,
        )


if __name__ == "__main__":
    main()
