"""`hwrjax export`: writes a trained model as stablehlo, a SavedModel or tflite, checked against JAX."""

from __future__ import annotations

import argparse
import os
import sys

from hwrjax.apps.export import FORMATS, PLATFORMS, ExportError, check_output, check_platforms, export_model
from hwrjax.cli.toolkit import ArgumentParser, check_run_workdir, run_command
from hwrjax.core import losses as losses_lib
from hwrjax.inference.loader import load_model


def _parse_batch_size(value: str) -> int | None:
    if value in ("polymorphic", "any", "dynamic"):
        return None
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise argparse.ArgumentTypeError(f"expected a positive integer or 'polymorphic', got {value!r}")


def _parse_platforms(value: str) -> tuple[str, ...]:
    platforms = tuple(p.strip() for p in value.split(",") if p.strip())
    try:
        return check_platforms(platforms)
    except ExportError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="hwrjax export",
        description="Serialize a trained model: float32 images [B,28,28,1] in [0,1] -> probabilities [B,C].")
    p.add_argument("--workdir", required=True, help="workdir of a training run")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="stablehlo (a jax.export file), savedmodel (a TF SavedModel directory), tflite (a file)")
    p.add_argument("--output", required=True, help="path to write; must not exist yet")
    p.add_checkpoint()
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=_parse_batch_size, default=None,
                   help="a fixed batch size, or 'polymorphic' (default): any batch size")
    p.add_argument("--platforms", type=_parse_platforms, default=PLATFORMS,
                   help="stablehlo/savedmodel: comma-separated platforms to lower for (default cpu,cuda,tpu); "
                        "tflite is always cpu")
    return p


def export_main(argv: list[str]) -> int:
    """`hwrjax export`: writes the artifact, checks it against JAX and prints what it holds."""

    def body(args: argparse.Namespace) -> int:
        check_run_workdir(args.workdir)
        check_output(args.output)
        model = load_model(args.workdir, args.checkpoint)
        path, diff = export_model(model, args.format, args.output, args.batch_size, args.platforms)
        batch = "B" if args.batch_size is None else str(args.batch_size)
        where = "cpu" if args.format == "tflite" else ",".join(args.platforms)
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) \
            if os.path.isdir(path) else os.path.getsize(path)
        check = "not run here" if diff != diff else f"max |diff| {diff:.1e}"
        sys.stdout.write(
            f"wrote {args.format} to {path} ({size / 1024:.0f} KiB, checkpoint step {model.step}, for {where})\n"
            f"  images float32[{batch},28,28,1] in [0,1] -> probabilities float32[{batch},{model.num_classes}] "
            f"({losses_lib.describe_probabilities(model.loss)}); "
            f"checked against JAX: {check}\n")
        return 0

    return run_command(_parser(), argv, body)
