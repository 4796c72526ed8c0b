"""`hwrjax finetune`: continues training a run on your own digit images, and prints the before/after table."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from hwrjax.apps.finetune import (REPORT_NAME, FinetuneOptions, check_options, check_output_workdir, finetune,
                                  load_samples)
from hwrjax.cli.toolkit import ArgumentParser, check_run_workdir, run_command
from hwrjax.core.errors import Preempted
from hwrjax.inference.loader import load_model


def format_table(report: dict) -> str:
    """The before/after accuracy table printed by `hwrjax finetune`."""
    names = {"holdout": "your held-out samples", "train_samples": "your training samples",
             "mnist_test": f"MNIST {report['mnist_split']}"}
    lines = [f"{'':<28}{'before':>9}{'after':>9}{'examples':>10}"]
    for key, name in names.items():
        if key in report["before"]:
            b, a = report["before"][key], report["after"][key]
            lines.append(f"{name:<28}{b['accuracy']:>9.2%}{a['accuracy']:>9.2%}{a['num_examples']:>10}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    d = FinetuneOptions()
    p = ArgumentParser(
        prog="hwrjax finetune", description="Continue training a run on your own digit images, mixed with MNIST.")
    p.add_argument("--workdir", required=True, help="workdir of the trained run to start from (never changed)")
    p.add_argument("--samples", required=True, help="folder with sub-folders 0..9 of your images")
    p.add_argument("--output-workdir", "--output_workdir", dest="output_workdir", required=True,
                   help="new workdir to write (must not exist or be empty; the folder of an interrupted "
                        "fine-tune is resumed)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over your training samples")
    p.add_argument("--mix", type=float, default=d.mix, help="share of each batch from your samples (rest: MNIST)")
    p.add_argument("--learning-rate", "--learning_rate", dest="learning_rate", type=float, default=None,
                   help="peak learning rate, cosine-decayed to 0 (default: a tenth of the base run's peak)")
    p.add_argument("--holdout", type=float, default=d.holdout, help="share of each class held out to measure")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=None,
                   help="batch size (default: the base run's)")
    p.add_argument("--seed", type=int, default=None, help="seed (default: the base run's)")
    p.add_checkpoint(d.checkpoint, help="base checkpoint: best, latest or a step number")
    p.add_argument("--test-split", "--test_split", dest="test_split", default=None,
                   help="MNIST split measured before and after (default: the base run's test split)")
    return p


def finetune_main(argv: Sequence[str]) -> int:
    """`hwrjax finetune`: checks everything, fine-tunes, prints the before/after table."""

    def body(args: argparse.Namespace) -> int:
        options = FinetuneOptions(epochs=args.epochs, mix=args.mix, learning_rate=args.learning_rate,
                                  holdout=args.holdout, batch_size=args.batch_size, seed=args.seed,
                                  checkpoint=args.checkpoint, test_split=args.test_split)
        check_options(options)
        check_run_workdir(args.workdir)
        check_output_workdir(args.output_workdir, args.workdir)
        num_classes = load_model(args.workdir, args.checkpoint).num_classes
        samples = load_samples(args.samples, num_classes)
        for path, why in samples.skipped:
            sys.stderr.write(f"hwrjax: skipped {path}: {why}\n")
        try:
            report = finetune(args.workdir, samples, args.output_workdir, options)
        except Preempted as e:  # a checkpoint was saved: the same command resumes
            sys.stderr.write(f"hwrjax: {e}\n")
            return 0
        sys.stdout.write(
            f"fine-tuned {report['base_workdir']} (step {report['base_checkpoint_step']}) on "
            f"{report['num_train_samples']} of your {report['num_samples']} samples for {report['steps']} steps "
            f"({report['train_time_s']:.0f} s) -> {report['workdir']}\n{format_table(report)}\n"
            f"report: {os.path.join(report['workdir'], 'report', REPORT_NAME)}\n")
        return 0

    return run_command(_parser(), argv, body)
