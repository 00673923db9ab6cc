"""The ``littlebig`` command: one console script, one subcommand per job.

Each subcommand imports its heavy modules (torch, onnxruntime, tritonclient) only when it runs, so
``littlebig classify`` works in a client-only install. Exit codes: 0 success, 1 the job ran and
failed (a parity or health check, a server error), 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path

BUILD = Path("build")
Command = Callable[[argparse.Namespace], int]  # runs a subcommand: its exit code
Arguments = Callable[[argparse.ArgumentParser], None]  # adds a subcommand's arguments


#: Every subcommand, in the order ``littlebig --help`` lists them: name -> (its parser's keywords, the function that
#: adds its arguments, the function that runs it).
SUBCOMMANDS: dict[str, tuple[dict[str, str], Arguments, Command]] = {}


def command(run: Command, *, help: str, epilog: str) -> Callable[[Arguments], Arguments]:
    """Register the decorated function as the arguments of the subcommand ``run`` answers (``_cmd_<name>``); its
    epilog (examples, exit codes) keeps its line breaks."""

    def register(arguments: Arguments) -> Arguments:
        SUBCOMMANDS[run.__name__.removeprefix("_cmd_")] = ({"help": help, "epilog": epilog}, arguments, run)
        return arguments

    return register


def _cmd_train_folder(args: argparse.Namespace) -> int:
    """A little companion on the user's folder, distilled from their big (export/train.py ``train_on_folder``)."""
    from littlebig.export.models import parse_data_config
    from littlebig.export.train import FOLDER_LITTLE, train_on_folder

    if args.role not in ("little", "middle"):
        raise ValueError(f"--data-dir FOLDER trains a distilled companion (little or middle), not {args.role}")
    if args.out is None or args.teacher is None:
        raise ValueError("training on a folder needs --teacher BIG_CHECKPOINT and --out PATH (the committed "
                         "checkpoints are Fashion-MNIST's)")
    if args.init is not None:
        raise ValueError("--init goes with the Fashion-MNIST recipes, not with --data-dir FOLDER")
    summary = train_on_folder(
        args.out, args.data_dir, args.teacher, model_name=args.model or FOLDER_LITTLE, teacher_name=args.teacher_model,
        teacher_data_config=parse_data_config(args.teacher_data_config or ""), teacher_ema=args.teacher_ema,
        epochs=args.epochs or 30, batch_size=args.batch_size, hflip=args.hflip, train_share=args.train_share,
        seed=args.seed, threads=args.threads, device=args.device, state_dir=args.state_dir,
    )
    split = summary["train_split"]
    print(f"{args.role} {summary['model']} on {summary['train_images']} train images ({split['share']:.0%} of each "
          f"class, seed {split['seed']}): val {summary['val_acc']:.4f}, {summary['train_seconds']:.0f} s over "
          f"{summary['epochs_done']} epochs -> {args.out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from littlebig.imagenet import is_imagenet_folder

    if args.data_dir is not None and is_imagenet_folder(args.data_dir):
        return _cmd_train_folder(args)
    from littlebig.export.train import train_role

    folder_only = {"--model": args.model, "--teacher-model": args.teacher_model,
                   "--teacher-data-config": args.teacher_data_config, "--train-share": args.train_share}
    given = [flag for flag, value in folder_only.items() if value is not None] + (["--teacher-ema"] * args.teacher_ema)
    if given:
        raise ValueError(f"{', '.join(given)}: only with --data-dir FOLDER (a folder of class folders)")
    summary = train_role(
        args.role, args.out, epochs=args.epochs, seed=args.seed, data_dir=args.data_dir, threads=args.threads,
        device=args.device, init=args.init, teacher=None if args.teacher is None else Path(args.teacher),
        state_dir=args.state_dir,
    )
    print(f"{args.role}: val {summary['val_acc']:.4f}, test {summary['test_acc']:.4f}, "
          f"{summary['train_seconds']:.0f} s over {summary['epochs_done']} epochs")
    return 0


@command(
    _cmd_train,
    help="train one model of the cascade (little, middle, big) on Fashion-MNIST, or a little on your folder",
    epilog="resumable: rerun the same command after a stop to continue from the last epoch\n"
    "examples (the committed pair, checkpoints/README.md):\n"
    "  littlebig train big64 --out build/train/big64.safetensors\n"
    "  littlebig train big --init build/train/big64.safetensors\n"
    "  littlebig train little --teacher checkpoints/big.safetensors\n"
    "a little companion on your own folder (root/<class>/<image>.jpg), distilled from your big:\n"
    "  littlebig train little --data-dir my_images/ --teacher output/train/model_best.pth.tar "
    "--out build/own/little.safetensors\n"
    "it trains on a seeded share of each class (--train-share, default 0.6), recorded in the checkpoint:\n"
    "export, calibrate and report then use only the rest (halved into val and test)",
)
def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("role", choices=["little", "middle", "big", "big64"], help="which recipe of the registry to train")
    p.add_argument("--out", type=Path, default=None, help="checkpoint path (default checkpoints/ROLE.safetensors)")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs (a folder: 30)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="torch device: cpu, or cuda where a GPU exists")
    p.add_argument("--init", type=Path, default=None, help="start from this checkpoint (same architecture)")
    p.add_argument(
        "--teacher", default=None,
        help="distil from this checkpoint's soft labels (with a folder: any form littlebig export reads)",
    )
    p.add_argument("--state-dir", type=Path, default=Path("build/train"), help="per-epoch resume state")
    p.add_argument(
        "--data-dir", default=None,
        help="Fashion-MNIST IDX folder, or your folder of class folders (trains a distilled little on it)",
    )
    g = p.add_argument_group("a little on your folder (--data-dir FOLDER)")
    g.add_argument("--model", default=None, help="the little's timm name (default mobilenetv3_small_075)")
    g.add_argument("--teacher-model", default=None, help="the teacher's timm name where its file records none")
    g.add_argument("--teacher-data-config", default=None, metavar="SPEC", help="as export's --big-data-config")
    g.add_argument("--teacher-ema", action="store_true", help="a timm teacher's state_dict_ema (export --use-ema)")
    g.add_argument("--train-share", type=float, default=None, help="share of each class trained on (default 0.6)")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--hflip", type=float, default=0.5, help="timm's horizontal-flip probability (0 for digits, text)")


def _weights(role: str, name: str | None, weights: str | None) -> tuple[str | None, str]:
    """Default weights: the committed checkpoint for the registry's model, timm's pretrained otherwise."""
    from littlebig.export.models import RECIPES, default_checkpoint

    if weights:
        return name, weights
    if role in RECIPES and (name is None or name == RECIPES[role].model):
        return name, str(default_checkpoint(role))
    return name, "pretrained"


def _cascade_models(args: argparse.Namespace) -> dict[str, tuple[str | None, str]]:
    """stage -> (timm name, weights) from ``--models A,B,C [--weights W,W,W]``, or ``--little/--big``."""
    from littlebig.decision import stage_names

    if args.models is None:
        if args.weights is not None:
            raise ValueError("--weights goes with --models; the two-model spelling is --little-weights/--big-weights")
        return {
            "little": _weights("little", args.little, args.little_weights),
            "big": _weights("big", args.big, args.big_weights),
        }
    if any(v is not None for v in (args.little, args.big, args.little_weights, args.big_weights)):
        raise ValueError("--models names every model: drop --little/--big and their weights")
    names = [n.strip() for n in args.models.split(",")]
    weights = [w.strip() for w in args.weights.split(",")] if args.weights else [None] * len(names)
    if len(names) < 2 or "" in names:
        raise ValueError(f"--models takes two or more timm names, cheapest first, got {args.models!r}")
    if len(weights) != len(names):
        raise ValueError(f"--weights has {len(weights)} entries for {len(names)} models")
    stages = stage_names(len(names))
    return {stage: _weights(stage, name, w) for stage, name, w in zip(stages, names, weights, strict=True)}


def _data_configs(args: argparse.Namespace, stages: tuple[str, ...]) -> dict[str, dict]:
    """Per stage, the data config a flag overlays: ``--little-data-config``, ``--big-data-config``, and
    ``--data-config STAGE:SPEC`` (any stage, repeatable)."""
    from littlebig.export.models import parse_data_config

    specs: dict[str, str] = {}
    for role in ("little", "big"):
        if getattr(args, f"{role}_data_config") is not None:
            specs[role] = getattr(args, f"{role}_data_config")
    for entry in args.data_config or []:
        stage, sep, spec = entry.partition(":")
        if not sep or stage not in stages:
            raise ValueError(f"--data-config takes STAGE:SPEC with STAGE one of {list(stages)}, got {entry!r}")
        if stage in specs:
            raise ValueError(f"two data configs for {stage}")
        specs[stage] = spec
    return {stage: parse_data_config(spec) for stage, spec in specs.items()}


def _is_littlebig_checkpoint(weights: str) -> bool:
    from littlebig.export.models import checkpoint_metadata

    if not weights.endswith(".safetensors") or not Path(weights).is_file():
        return False
    try:
        checkpoint_metadata(Path(weights))
    except ValueError:
        return False
    return True


def _cmd_export(args: argparse.Namespace) -> int:
    if args.tensorrt:
        from littlebig.export.tensorrt import run_tensorrt_cli

        return run_tensorrt_cli(args.build, args.precision, args.max_batch_size)
    from littlebig.export.models import DEFAULT_SERVICE_SIZE, RECIPES
    from littlebig.export.onnx_export import ParityError
    from littlebig.export.pipeline import export_models, parse_size

    try:
        models = _cascade_models(args)
        configs = _data_configs(args, tuple(models))
    except ValueError as exc:
        print(f"littlebig export: {exc}", file=sys.stderr)
        return 2
    size = parse_size(args.service_size) if args.service_size else None
    registry = all(name is None or (s in RECIPES and name == RECIPES[s].model) for s, (name, _) in models.items())
    # The registry's own models, trained by littlebig: Fashion-MNIST's 28x28 images. A user's checkpoint (timm's,
    # torch's) gets big's own size instead, as any other pair.
    registry = registry and not configs and all(
        _is_littlebig_checkpoint(w) or w.startswith("pretrained") for _, w in models.values()
    )
    if size is None and registry:
        size = DEFAULT_SERVICE_SIZE
    try:
        record = export_models(
            args.build, {s: w for s, (_, w) in models.items()}, {s: n for s, (n, _) in models.items()}, size,
            args.data_dir, max_images=args.max_images, workers=args.workers, data_configs=configs,
            use_ema=args.use_ema,
        )
    except ParityError as exc:
        print(f"littlebig export: {exc}", file=sys.stderr)
        return 1
    for role in record["stages"]:
        r = record[role]
        print(
            f"{role:7s} {r['name']:24s} params {r['params'] / 1e6:6.2f}M  MACs {r['macs'] / 1e6:8.2f}M  "
            f"parity max abs {r['parity']['max_abs']:.1e}, argmax agreement {r['parity']['argmax_agreement']:.0%}"
        )
        c, ck = r["data_config"], r["checkpoint"]
        state = f" {ck['state']}" if ck["state"] else ""
        flag = " + flag" if ck["data_config_flag"] else ""
        print(
            f"        {ck['form']}{state}; data config ({ck['data_config_from']}{flag}): input_size "
            f"{'x'.join(map(str, c['input_size']))}, crop_pct {c['crop_pct']} {c.get('crop_mode') or 'center'}, "
            f"{c['interpolation']}, mean {c['mean']}, std {c['std']}; classes from {r['class_names_from']}"
        )
    names = record["class_names"]
    print(f"classes ({len(names)}): {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}")
    if record.get("train_split"):
        ts = record["train_split"]
        print(f"split: {ts['share']:.0%} of each class is train (seed {ts['seed']}): val and test halve the rest")
    print(f"wrote {args.build / 'export'} (service size {record['service_size']})")
    return 0


@command(
    _cmd_export,
    help="export the cascade's models (little/big, or any number) to ONNX with preprocessing inside",
    epilog="examples:\n  littlebig export\n"
    "  littlebig export --models mobilenetv3_small_075,resnet10t,resnet18 --build build/three  "
    "# three stages: little, middle, big\n"
    "  littlebig export --little deit_tiny_patch16_224 --big deit_base_patch16_384 "
    "--little-weights pretrained --big-weights pretrained --data-dir my_images/\n"
    "  littlebig export --little efficientnet_b0 --big tf_efficientnet_b7 --little-weights pretrained "
    "--big-weights pretrained --data-dir ~/imagenet/val --max-images 2000\n"
    "  littlebig export --big-weights output/train/model_best.pth.tar --little-weights little.safetensors "
    "--data-dir my_images/\n"
    "  littlebig export --big resnet50 --big-weights resnet50.pth --big-data-config "
    "input_size=3x128x128,crop_pct=1.0 ...\n"
    "weights: a littlebig checkpoint, a timm train.py checkpoint (.pth.tar: state_dict, or state_dict_ema with\n"
    "--use-ema; arch and data config from it), a torch state dict (.pth/.pt, 'module.' prefix or not), a plain\n"
    "safetensors state dict, 'pretrained' (timm's hub), or 'pretrained:FILE' (the hub's file, local). torch\n"
    "files are read with weights_only=True: one that needs pickled code is refused. Class count and input\n"
    "channels come from the head and stem weights; class names from the checkpoint, else the folder's sorted\n"
    "class folders. Data config: the architecture's, then the checkpoint's record, then --*-data-config.\n"
    "--data-dir: Fashion-MNIST IDX files, a folder with val/ test/ class folders, or an ImageNet-style\n"
    "folder (one sub-folder per class, as ILSVRC2012 val): streamed, split in a calibration and a test half\n"
    "(less the train share a littlebig little trained on it records)",
)
def _add_export(p: argparse.ArgumentParser) -> None:
    for role in ("little", "big"):
        p.add_argument(
            f"--{role}", default=None,
            help=f"timm model name of {role} (default: the registry's, or the checkpoint's arch)",
        )
        p.add_argument(
            f"--{role}-weights",
            default=None,
            help="a littlebig, timm train.py, torch state dict or safetensors checkpoint, or 'pretrained'",
        )
        p.add_argument(
            f"--{role}-data-config", default=None, metavar="SPEC",
            help=f"override {role}'s data config: input_size=CxHxW,img_size=N,crop_pct=F,crop_mode=center|squash,"
            "mean=A,B,C,std=A,B,C,interpolation=bicubic|bilinear|nearest (any subset)",
        )
    p.add_argument(
        "--models", default=None,
        help="two or more timm names, cheapest first (stages little, middle..., big); instead of --little/--big",
    )
    p.add_argument(
        "--weights", default=None,
        help="with --models: one weights entry per model, comma-separated (default: the registry's checkpoint "
        "where the name is the stage's recipe, else 'pretrained')",
    )
    p.add_argument(
        "--data-config", action="append", default=None, metavar="STAGE:SPEC",
        help="a stage's data config override (any stage, e.g. middle:crop_pct=1.0); repeatable",
    )
    p.add_argument(
        "--use-ema", action="store_true",
        help="timm train.py checkpoints: load state_dict_ema where present (timm validate.py's --use-ema)",
    )
    p.add_argument(
        "--service-size",
        default=None,
        help="served image size HxWxC (default: 28x28x1 for the default pair, else big's floor(size / crop_pct) "
        "where big centre-crops with crop_pct < 1, else big's size)",
    )
    p.add_argument(
        "--data-dir", default=None, help="Fashion-MNIST IDX folder, a folder with val/ test/, or an ImageNet folder"
    )
    _add_data_options(p, data_dir=False, compute=False)
    p.add_argument("--build", type=Path, default=BUILD)
    trt = p.add_argument_group("TensorRT (needs a GPU): plans from the exported ONNX files, checked and calibrated")
    trt.add_argument("--tensorrt", action="store_true", help="build TensorRT plans instead of exporting ONNX")
    trt.add_argument("--precision", choices=["fp16", "fp32"], default="fp16")
    trt.add_argument("--max-batch-size", type=int, default=64, help="the plans' optimisation profile: 1..N")


def _add_data_options(p: argparse.ArgumentParser, data_dir: bool = True, compute: bool = True) -> None:
    """The data and the logits pass: which images, how many, where they run."""
    g = p.add_argument_group("data and compute")
    if data_dir:
        g.add_argument("--data-dir", default=None, help="use this data from now on (default: what export recorded)")
    g.add_argument(
        "--max-images", type=int, default=None, help="a quick run: a seeded sample of N images, half per split"
    )
    g.add_argument("--workers", type=int, default=None, help="decoding processes for an ImageNet folder")
    if compute:
        g.add_argument(
            "--device", choices=["auto", "cpu", "cuda"], default="auto",
            help="onnxruntime provider of the logits pass (auto: CUDA where onnxruntime-gpu is installed)",
        )
        g.add_argument("--batch-size", type=int, default=None, help="rows per onnxruntime call")


def _logits(args: argparse.Namespace, split: str) -> None:
    """The logits pass of ``split`` with this command's data and compute options (cached for the step)."""
    from littlebig.export.pipeline import reference_logits, set_data

    options = {"device": args.device, "batch_size": args.batch_size, "workers": args.workers}
    if args.data_dir is not None or args.max_images is not None:
        set_data(args.build, args.data_dir, args.max_images, split, **options)
    reference_logits(args.build, split, **options)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from littlebig.export.pipeline import calibrate_step, check_serve_rule

    check_serve_rule(tuple(args.rules), args.serve_rule)
    _logits(args, "val")
    calibration = calibrate_step(args.build, tuple(args.rules), args.serve_rule)
    print(f"val: little {calibration.little_acc:.4f}, big {calibration.big_acc:.4f} ({calibration.rows} images)")
    if len(calibration.stages) > 2:
        accs = ", ".join(f"{a:.4f}" for a in calibration.stage_acc)
        print(f"stages {' -> '.join(calibration.stages)}: val acc {accs}")
    for rule, r in calibration.rules.items():
        ts = "/".join(f"{t:.6f}" for t in r.thresholds)
        shares = " / ".join(f"{x:.1%}" for x in r.figures["stage_shares"])
        rows = "" if len(r.thresholds) == 1 else f"  rows per stage {shares}"
        print(f"{rule:10s} T={ts}  val acc {r.figures['accuracy']:.4f}  escalated {r.escalation_rate:.1%}{rows}")
    return 0


@command(
    _cmd_calibrate,
    help="choose the threshold T on the val split",
    epilog="example: littlebig calibrate --rules paper bounded guaranteed --serve-rule bounded\n"
    "rules: export/calibrate.py (README, Calibration); bounded promises accuracy loss vs big <= eps w.p. 1-delta",
)
def _add_calibrate(p: argparse.ArgumentParser) -> None:
    from littlebig.export.calibrate import RULES, SERVE_RULE  # numpy only

    p.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    p.add_argument("--serve-rule", default=SERVE_RULE, choices=list(RULES), help="the rule whose T is served")
    p.add_argument("--build", type=Path, default=BUILD)
    _add_data_options(p)


def _cmd_recalibrate(args: argparse.Namespace) -> int:
    """The repository (when given) is checked before anything is written: a refusal changes no file."""
    import json
    from dataclasses import replace

    from littlebig.export.pipeline import SHADOW_CALIBRATION, SHADOW_RULE, shadow_calibration_step

    if args.repository is not None:
        from littlebig.model_repository.generate import (
            REPOSITORY_RECORD,
            ServeOptions,
            check_not_served,
            generate,
            recorded_options,
        )

        summary_path = args.repository / REPOSITORY_RECORD
        if not summary_path.exists():
            raise FileNotFoundError(f"{summary_path} not found: --repository must be one `littlebig repo` generated")
        summary = json.loads(summary_path.read_text())
        opts = replace(ServeOptions(**recorded_options(summary)), rule=SHADOW_RULE, threshold=None)
        opts.validate(summary["profile"])
        check_not_served(args.repository)
    record = shadow_calibration_step(args.build, args.from_shadow, args.since)
    kinds = ", ".join(f"{n} {k}" for k, n in record["kinds"].items())
    print(
        f"{record['rows']} live rows ({kinds}): T={record['threshold']:.6f} (was {record['calibrated_threshold']:.6f}, "
        f"{record['calibrated_rule']}); escalated {record['escalation_rate']:.1%}, disagreement "
        f"{record['disagreement']:.2%} (eps {record['eps']}, delta {record['delta']}) "
        f"-> {args.build / SHADOW_CALIBRATION}"
    )
    if args.repository is None:
        print(f"serve it: littlebig serve --rule {SHADOW_RULE} (or littlebig repo --rule {SHADOW_RULE} ...)")
        return 0
    generate(args.build, args.repository, summary["profile"], opts)
    print(
        f"regenerated {args.repository} ({summary['profile']}) with T={record['threshold']:.6f}: start a server on it "
        "(littlebig serve --repository ...)"
    )
    return 0


@command(
    _cmd_recalibrate,
    help="choose T again from live shadow records (littlebig serve --shadow-rate R)",
    epilog="example: littlebig recalibrate --from-shadow build/logs --repository build/model_repository\n"
    "The records are a uniform R-sample of traffic; T is guaranteed's exact test on them "
    "(README, Shadow sampling).",
)
def _add_recalibrate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from-shadow", type=Path, required=True, help="folder of the shadow records (shadow-*.jsonl*)")
    p.add_argument("--since", type=float, default=None, help="only records at or after this Unix time")
    p.add_argument("--build", type=Path, default=BUILD, help="calibration.json's folder; the result goes beside it")
    p.add_argument(
        "--repository", type=Path, default=None,
        help="regenerate this repository with the new T (its recorded deployment options, rule shadow)",
    )  # fmt: skip


def _cmd_report(args: argparse.Namespace) -> int:
    from littlebig.export.report import build_report, format_table, stage_rows, summary_rows

    _logits(args, "test")
    report = build_report(args.build)
    print(format_table(summary_rows(report)))
    if "stages" in report:
        print(f"\ntwo stages against {len(report['stages']['stages'])} (each calibrated on val by the same rule):")
        print(format_table(stage_rows(report)))
    for name, ok in report["targets"].items():
        print(f"target {name}: {'met' if ok else 'MISSED'}")
    print(f"wrote {args.build / 'report.json'}, report.md, tradeoff.png")
    return 0


@command(
    _cmd_report,
    help="the offline cascade result on the test split (json, md, png)",
    epilog="example: littlebig report --build build",
)
def _add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("--build", type=Path, default=BUILD)
    _add_data_options(p)


def add_serve_options(p: argparse.ArgumentParser, build: bool = True) -> None:
    """The deployment flags, one per ServeOptions field marked ``flag`` (its help, type and choices come from the
    field); a flag left out keeps the field's default (the measured CPU settings)."""
    from littlebig.model_repository.generate import deployment_flags

    g = p.add_argument_group("deployment options (default: the measured CPU settings)")
    for name, kwargs in deployment_flags().items():
        g.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, **kwargs)
    if build:
        g.add_argument("--build", type=Path, default=BUILD)


def given_serve_options(args: argparse.Namespace) -> dict[str, object]:
    """Only the deployment flags given on the command line (None means: not given)."""
    from littlebig.model_repository.generate import deployment_flags

    return {k: getattr(args, k) for k in deployment_flags() if getattr(args, k, None) is not None}


def serve_options(args: argparse.Namespace):
    """ServeOptions from the deployment flags: their one parser (littlebig repo/serve and the benchmarks)."""
    from littlebig.model_repository.generate import ServeOptions

    return ServeOptions(**given_serve_options(args))


def _cmd_repo(args: argparse.Namespace) -> int:
    from littlebig.model_repository.generate import generate

    summary = generate(args.build, args.out, args.profile, serve_options(args))
    print(
        f"wrote {args.profile} repository {args.out}: models {', '.join(summary['models'])}; "
        "T=" + "/".join(f"{t:.6f}" for t in summary["thresholds"]) + f" ({summary['rule']})"
    )
    return 0


@command(
    _cmd_repo,
    help="generate the Triton model repository (cpu or gpu profile)",
    epilog="examples:\n  littlebig repo --profile cpu --out build/model_repository\n"
    "  littlebig repo --profile gpu --out build/model_repository_gpu",
)
def _add_repo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--out", type=Path, default=BUILD / "model_repository")
    add_serve_options(p)


def _cmd_serve(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM/SIGHUP; the supervisor restarts tritonserver when a real inference fails."""
    import logging
    import os

    from littlebig.model_repository.generate import prepare_repository
    from littlebig.model_repository.server import (
        ADMIN_HEADER,
        ADMIN_KEY_ENV,
        Ports,
        StopSignals,
        Supervisor,
        SupervisorGaveUp,
        TritonServer,
    )

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    repo = args.repository
    print(prepare_repository(repo, args.build, given_serve_options(args)), flush=True)
    ports = Ports(args.http_port, args.grpc_port, args.metrics_port)
    stop = StopSignals()  # lock-free: make forwards the TERM its group got, so two can come at once
    server = TritonServer(repo, ports, address=args.address, log_file=args.log_file)
    with server.start(timeout=args.ready_timeout):
        print(
            f"littlebig is ready: gRPC {args.address}:{ports.grpc}, HTTP {server.url}, "
            f"metrics http://{args.address}:{ports.metrics}/metrics (Ctrl-C stops)\n"
            f"admin APIs need the header {ADMIN_HEADER!r} (HTTP) / 'triton-grpc-protocol-{ADMIN_HEADER}' (gRPC) "
            f"with the key in ${ADMIN_KEY_ENV}" + ("" if os.environ.get(ADMIN_KEY_ENV) else " (unset: a random key)"),
            flush=True,
        )
        if args.health_interval > 0:
            supervisor = Supervisor(
                server,
                interval=args.health_interval,
                probe_timeout=args.health_timeout,
                failures=args.health_failures,
                max_restarts=args.max_restarts,
                ready_timeout=args.ready_timeout,
            )
            try:
                supervisor.run(stop)
            except SupervisorGaveUp as exc:
                print(f"littlebig serve: {exc}", file=sys.stderr)
                return 1
        else:
            while not stop.wait(1.0):
                if server.process.poll() is not None:
                    print(f"tritonserver exited with code {server.process.returncode}", file=sys.stderr)
                    return 1
        print("stopping tritonserver", flush=True)
    return 0


@command(
    _cmd_serve,
    help="run the embedded tritonserver on the cpu repository",
    epilog="example: HTTP_PORT=9000 littlebig serve   (or: make serve)",
)
def _add_serve(p: argparse.ArgumentParser) -> None:
    import os

    p.add_argument("--repository", type=Path, default=BUILD / "model_repository")
    p.add_argument("--address", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--http-port", type=int, default=int(os.environ.get("HTTP_PORT", 8000)))
    p.add_argument("--grpc-port", type=int, default=int(os.environ.get("GRPC_PORT", 8001)))
    p.add_argument("--metrics-port", type=int, default=int(os.environ.get("METRICS_PORT", 8002)))
    p.add_argument("--log-file", type=Path, default=BUILD / "tritonserver.log")
    p.add_argument("--ready-timeout", type=float, default=120.0)
    h = p.add_argument_group("supervision (a real inference through little, big and littlebig)")
    h.add_argument(
        "--health-interval", type=float, default=10.0, help="seconds between health checks; 0 turns supervision off"
    )
    h.add_argument("--health-timeout", type=float, default=10.0, help="seconds one probe inference may take")
    h.add_argument("--health-failures", type=int, default=2, help="failed checks in a row that trigger a restart")
    h.add_argument("--max-restarts", type=int, default=10, help="give up (exit 1) after this many restarts")
    add_serve_options(p)


def _client_errors(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Client failures as one line on stderr: exit 2 for the caller's input, 1 for the service."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        from littlebig.client import ClientError, InputError

        try:
            return fn(args)
        except ClientError as exc:
            print(f"littlebig {args.command}: {exc}", file=sys.stderr)
            return 2 if isinstance(exc, InputError) else 1

    return run


def _add_address(p: argparse.ArgumentParser, flag: str, env: str, default: str, what: str) -> None:
    """A server address flag whose default an environment variable can set (containers, scripts)."""
    import os

    p.add_argument(flag, default=os.environ.get(env, default), help=f"{what} (default {default}, or ${env})")


def _add_client_options(p: argparse.ArgumentParser, model: bool = True) -> None:
    _add_address(p, "--url", "LITTLEBIG_URL", "localhost:8001", "the server's gRPC address")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout in seconds")
    if model:
        p.add_argument("--model", default="littlebig", help="littlebig (the cascade), or little / big directly")
        p.add_argument("--threshold", default=None, help="override the served threshold T for these requests")


def _cmd_classify(args: argparse.Namespace) -> int:
    import json

    from littlebig.client import LittleBigClient

    with LittleBigClient(args.url, args.model, timeout_s=args.timeout, send=args.send) as client:
        result = client.classify(args.paths, threshold=args.threshold, deadline_ms=args.deadline_ms)
    records = result.records(top_k=args.top_k)
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    width = max([len(r["file"]) for r in records] + [4])
    print(f"{'file':{width}s}  {'label':14s}  confidence  escalated  reason")
    for r in records:
        top = "" if args.top_k <= 1 else "  " + ", ".join(f"{t['name']} {t['prob']:.3f}" for t in r["top_k"])
        print(
            f"{r['file']:{width}s}  {r['name']:14s}  {r['confidence']:10.4f}  {'yes' if r['escalated'] else 'no':9s}"
            f"  {r.get('reason', '-'):10s}" + top
        )
    return 0


@command(
    _client_errors(_cmd_classify),
    help="classify image files or folders through the server",
    epilog="examples:\n  littlebig classify shirt.png boots.jpg\n"
    "  littlebig classify photos/ --top-k 3 --json --threshold 0.9\n"
    "  littlebig classify photo.jpg --send pixels   (decode and resize here, send raw pixels)\n"
    "exit codes: 0 answered, 1 server unreachable or failed, 2 bad input (file, threshold)",
)
def _add_classify(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", help="PNG/JPEG files or folders (walked recursively)")
    p.add_argument("--json", action="store_true", help="one JSON record per image")
    p.add_argument("--top-k", type=int, default=1, help="also list the k most likely classes")
    p.add_argument(
        "--send",
        choices=["encoded", "pixels"],
        default="encoded",
        help="encoded (default): the files' JPEG/PNG bytes, decoded by the server's littlebig_encoded entry point "
        "(pixels where the server has none); pixels: decoded and resized here",
    )
    p.add_argument(
        "--deadline-ms",
        type=float,
        default=None,
        help="time you will wait: rows big cannot answer within it come back from little (REASON deadline)",
    )
    _add_client_options(p)


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from littlebig.client.evaluate import evaluate, format_summary

    summary = evaluate(
        args.url,
        args.model,
        args.data_dir,
        args.split,
        args.threshold,
        args.batch_size,
        args.concurrency,
        args.timeout,
        args.build,
        progress=not args.json,
        limit=args.limit,
    )
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0 if summary.get("matches_offline", True) else 1


@command(
    _client_errors(_cmd_eval),
    help="a labelled split through the server: accuracy, escalation, MACs, speed",
    epilog="examples:\n  littlebig eval\n  littlebig eval --model big --json\n"
    "  littlebig eval --data-dir my_images/ --split test\n"
    "exit codes: 0 done (and equal to the offline report where comparable), "
    "1 server failed or served accuracy differs from the offline report, 2 bad input",
)
def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder, or an image folder with SPLIT/")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--json", action="store_true")
    p.add_argument("--build", type=Path, default=BUILD, help="where export.json / report.json are")
    _add_client_options(p)


def _cmd_health(args: argparse.Namespace) -> int:
    """model_repository/health.py, the one health check the supervisor and the deploy probes run too."""
    from littlebig.model_repository.health import HealthProbe

    probe = HealthProbe(args.http_url, timeout=args.timeout)
    report = {"server": probe.live()} if args.live else probe.report()
    for model, error in report.items():
        print(f"{model:10s} {'ok' if error is None else 'FAILED: ' + error}")
    if any(e is not None and e.startswith("no answer") for e in report.values()):
        print(f"cannot reach the littlebig server at {probe.url}: start it with `make serve` (or `littlebig serve`)")
    return 0 if all(e is None for e in report.values()) else 1


@command(
    _cmd_health,
    help="readiness: a real inference through little, big and littlebig (DEGRADED fails); --live: cheap",
    epilog="examples:\n  littlebig health --http-url localhost:8000\n  littlebig health --live\n"
    "the same check as the supervisor, compose and Kubernetes (model_repository/health.py)\n"
    "exit codes: 0 healthy, 1 any model failed or answered DEGRADED (readiness alone misses a dead stub)",
)
def _add_health(p: argparse.ArgumentParser) -> None:
    _add_address(p, "--http-url", "LITTLEBIG_HTTP_URL", "localhost:8000", "the server's HTTP address")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per HTTP call")
    p.add_argument("--live", action="store_true", help="liveness only: /v2/health/live, no inference")


def _cmd_demo(args: argparse.Namespace) -> int:
    from littlebig.demo import run_demo

    return 0 if run_demo(args.build, args.batch_size, args.concurrency)["ok"] else 1


@command(
    _client_errors(_cmd_demo),
    help="serve the exported pair and run the test split through it (make demo)",
    epilog="example: littlebig demo   (after export, calibrate, report; make demo does all)\n"
    "exit codes: 0 every served accuracy equals the offline report, 1 otherwise",
)
def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--build", type=Path, default=BUILD)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)


def _cmd_monitor(args: argparse.Namespace) -> int:
    from littlebig.monitor import run

    return run(args.metrics_url, interval=args.interval, window=args.window, once=args.once, as_json=args.json)


@command(
    _cmd_monitor,
    help="live traffic, drift and shadow-loss figures from the server's metrics port (no Prometheus needed)",
    epilog="examples:\n  littlebig monitor --metrics-url http://127.0.0.1:8002/metrics\n"
    "  littlebig monitor --once --json --interval 10   # one frame over 10 s, for scripts\n"
    "the statistics and thresholds of deploy/prometheus/littlebig.rules.yml, over the monitor's own window\n"
    "exit codes: 0 done (Ctrl-C too), 2 the metrics URL cannot be read",
)
def _add_monitor(p: argparse.ArgumentParser) -> None:
    _add_address(p, "--metrics-url", "LITTLEBIG_METRICS_URL", "http://127.0.0.1:8002/metrics",
                 "Triton's metrics endpoint")  # fmt: skip
    p.add_argument("--interval", type=float, default=2.0, help="seconds between scrapes (and frames)")
    p.add_argument(
        "--window", type=float, default=1800.0, help="seconds of scrapes the figures cover (rates, drift, loss)"
    )
    p.add_argument("--once", action="store_true", help="one frame from two scrapes --interval apart, then exit")
    p.add_argument("--json", action="store_true", help="the figures as JSON (one object per frame) instead of text")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="littlebig", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (texts, arguments, run) in SUBCOMMANDS.items():
        p = sub.add_parser(name, formatter_class=argparse.RawDescriptionHelpFormatter, **texts)
        arguments(p)
        p.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"littlebig {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
