"""``dass-ray``: the command line.

Subcommands::

    dass-ray data digits --out DIR [--seed S]          build the built-in benchmark
    dass-ray data convert {cityscapes,gta5,synthia,acdc} --src SRC --out DIR [...]
    dass-ray run CONFIG [--out DIR] [--set k=v ...]    run what the config declares (resumable)
    dass-ray train-ddpm CONFIG [--out DIR] [--set ...] train (or reuse) the target DDPM only
    dass-ray translate CONFIG --level n [--segmenter CKPT] --out DIR [--limit K]
    dass-ray eval CONFIG --checkpoint CKPT [--split DOMAIN/SPLIT]
    dass-ray tune CONFIG --space SPACE [--samples K] [--scheduler asha|fifo] [--out DIR]
    dass-ray validate FILE...                          check experiment / tune-space files

Errors in configs and data are reported in one line naming the key or file,
with exit code 2; no traceback for the user's mistakes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional


def _add_config_args(p: argparse.ArgumentParser, out_required: bool = False,
                     out_help: str = "output directory (default runs/<name>/<timestamp>)") -> None:
    p.add_argument("config", help="experiment YAML file (see experiments/)")
    p.add_argument("--out", required=out_required, help=out_help)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set ptl.N=800 --set guidance.scale=1e3")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="dass-ray",
        description="Domain-adaptive semantic segmentation by diffusion translation (label-guided DDPM + PTL, "
                    "ZoDi) on Ray. Start with: dass-ray run experiments/digits_ptl.yaml",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("data", help="build the digits benchmark or convert a public dataset")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    q = dsub.add_parser("digits", help="build the built-in digits benchmark (MNIST -> MNIST-M style), no network")
    q.add_argument("--out", required=True, help="output root")
    q.add_argument("--seed", type=int, default=0)
    q = dsub.add_parser("convert", help="convert a public dataset's own layout onto dass-ray's layout")
    q.add_argument("dataset", choices=["cityscapes", "gta5", "synthia", "acdc"])
    q.add_argument("--src", required=True, help="the dataset's root as downloaded")
    q.add_argument("--out", required=True, help="output root (<out>/<domain>/<split>/...)")
    q.add_argument("--split", default="train", help="split to convert (cityscapes, acdc)")
    q.add_argument("--domain", default=None, help="domain name in the output (default: the dataset's name)")
    q.add_argument("--labels", choices=["cityscapes19", "synthia16"], default="cityscapes19",
                   help="label protocol for cityscapes / acdc (synthia16 for SYNTHIA -> Cityscapes)")
    q.add_argument("--conditions", default="night,snow,rain,fog",
                   help="ACDC conditions, comma-separated (one domain acdc_<condition> each)")

    p = sub.add_parser("run", help="run what the config declares into DIR (resumes when DIR exists)")
    _add_config_args(p)

    p = sub.add_parser("train-ddpm", help="train (or reuse from the cache) the target DDPM of a config")
    _add_config_args(p)

    p = sub.add_parser("translate", help="translate source images to level n (phi^n + SGG) with a Ray Data actor pool")
    _add_config_args(p, out_required=True)
    p.add_argument("--level", type=int, required=True, help="n: diffuse n steps, reverse n steps")
    p.add_argument("--segmenter", default=None, help="segmenter checkpoint for SGG (default: none = phi^n)")
    p.add_argument("--unet", default=None, help="DDPM weights (default: the config's cached DDPM)")
    p.add_argument("--limit", type=int, default=None, help="translate only the first K source images")

    p = sub.add_parser("eval", help="evaluate a segmenter checkpoint on a split (mIoU, per-class IoU)")
    _add_config_args(p, out_help="also write the result to DIR/eval_<domain>_<split>.json (default: print only)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", default=None, help="DOMAIN/SPLIT (default: the target val split)")

    p = sub.add_parser("tune", help="Ray Tune sweep over a search space, logged to MLflow")
    _add_config_args(p, out_help="output directory (default runs/<name>-tune/<timestamp>)")
    p.add_argument("--space", required=True, help="search space YAML (see tune_spaces/)")
    p.add_argument("--samples", type=int, default=None, help="number of trials (default: the space's)")
    p.add_argument("--scheduler", choices=["asha", "fifo"], default=None)

    p = sub.add_parser("validate", help="load and validate experiment configs and tune spaces")
    p.add_argument("files", nargs="+")
    return ap


def _out_dir(args, cfg) -> Path:
    from .run_state import default_run_dir

    return Path(args.out) if args.out else default_run_dir(cfg)


def main(argv: Optional[list[str]] = None) -> int:
    from .checkpoints import CheckpointError
    from .config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        from .data.layout import DataError
    except ImportError:  # pragma: no cover
        DataError = ConfigError  # type: ignore
    try:
        return _dispatch(args)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as e:
        print(f"dass-ray: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dass-ray: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


def _dispatch(args) -> int:
    from .config import load_config

    if args.cmd == "data":
        if args.data_cmd == "digits":
            from .data.digits import build_digits

            manifest = build_digits(args.out, seed=args.seed)
            print(json.dumps({k: manifest[k] for k in ("seed", "counts") if k in manifest}, indent=2))
            print(f"digits benchmark in {args.out}")
            return 0
        from .data import public

        if args.dataset == "cityscapes":
            n = public.convert_cityscapes(args.src, args.out, args.split, domain=args.domain or "cityscapes",
                                         labels=args.labels)
        elif args.dataset == "gta5":
            n = public.convert_gta5(args.src, args.out, args.split, domain=args.domain or "gta5")
        elif args.dataset == "synthia":
            n = public.convert_synthia(args.src, args.out, args.split, domain=args.domain or "synthia")
        else:
            n = public.convert_acdc(args.src, args.out, args.split, conditions=tuple(args.conditions.split(",")),
                                    labels=args.labels)
        print(f"converted {n} samples of {args.dataset} into {args.out}")
        return 0

    if args.cmd == "validate":
        from .tune_space import load_space

        for f in args.files:
            if "tune_spaces" in Path(f).parts or Path(f).parent.name == "tune_spaces":
                load_space(f)
            else:
                load_config(f)
            print(f"ok  {f}")
        return 0

    from .config import absolute_paths

    # relative paths in the config are relative to where the command runs, not to Ray's workers
    cfg = absolute_paths(load_config(args.config, args.overrides))

    if args.cmd == "run":
        from .pipeline import run

        run(cfg, _out_dir(args, cfg))
        return 0

    if args.cmd == "train-ddpm":
        from .ray_utils import ensure_ray
        from .run_state import RunDir
        from .stages.common import ensure_data
        from .stages.ddpm import run_ddpm_stage
        from .tracking import Tracker

        rd = RunDir(_out_dir(args, cfg), cfg)
        ensure_data(cfg)
        ensure_ray(cfg.ray)
        tracker = Tracker(cfg, rd.path)
        tracker.start(run_name=f"{cfg.name}-ddpm")
        try:
            path = run_ddpm_stage(cfg, rd.path, tracker=tracker)
            from .stages.ddpm_samples import sample_grid

            grid_path = sample_grid(cfg, path, rd.path / "pictures" / "ddpm_samples.png")
            tracker.log_artifact(grid_path, "pictures")
        except BaseException:
            tracker.end(status="FAILED")
            raise
        tracker.end()
        print(f"DDPM weights: {path}")
        return 0

    if args.cmd == "translate":
        from .stages.translate_cli import translate_command

        translate_command(cfg, Path(args.out), args.level, args.segmenter, args.unet, args.limit)
        return 0

    if args.cmd == "eval":
        from .pipeline import evaluate_checkpoint

        domain = split = None
        if args.split:
            if "/" not in args.split:
                from .config import ConfigError

                raise ConfigError(f"--split {args.split!r}: expected DOMAIN/SPLIT, e.g. target/val")
            domain, split = args.split.split("/", 1)
        res = evaluate_checkpoint(cfg, Path(args.checkpoint), domain, split)
        print(json.dumps(res, indent=2))
        if args.out:
            from .checkpoints import atomic_write_json  # as every other JSON record of a run

            domain, split = domain or cfg.data.target_domain, split or cfg.data.target_val_split
            path = Path(args.out) / f"eval_{domain}_{split}.json"
            atomic_write_json(path, res)
            print(f"written to {path}")
        return 0

    if args.cmd == "tune":
        from .tune_runner import run_tune

        run_tune(cfg, args.space, out=Path(args.out) if args.out else None, samples=args.samples,
                 scheduler=args.scheduler)
        return 0
    raise AssertionError(args.cmd)


if __name__ == "__main__":
    sys.exit(main())
