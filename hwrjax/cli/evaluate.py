"""`hwrjax evaluate`, `hwrjax calibrate` and `hwrjax compare`: reports, temperatures and tables of trained runs."""

from __future__ import annotations

import argparse
import json
import os
import sys

from hwrjax.apps import evaluate as evaluate_lib
from hwrjax.cli.toolkit import ArgumentParser, check_run_workdir, check_writable, run_command, writable_at
from hwrjax.core.errors import CheckpointError
from hwrjax.inference import metrics as metrics_lib
from hwrjax.training import storage


def _evaluate_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="hwrjax evaluate", description="Metrics, plots, TTA and ensembles of trained runs.")
    p.add_argument("--workdir", action="append", required=True,
                   help="workdir of a training run; repeat to evaluate the ensemble (mean probabilities)")
    p.add_argument("--split", default="test",
                   help="test (the run's test split), validation, train, a tfds split such as 'test[:1000]', or a "
                        "folder of your own labelled images (sub-folders 0..9, each holding images of that digit)")
    p.add_argument("--tta", type=int, default=0,
                   help="test-time augmentation: average K views (view 0 unchanged); 0 or 1 disables")
    p.add_checkpoint()
    p.add_argument("--output", default=None,
                   help="JSON report path (default WORKDIR/report/<split>[_ensembleN][_ttaK]_metrics.json); "
                        "with a read-only workdir the pictures go beside it")
    p.add_argument("--batch_size", type=int, default=None,
                   help="inference batch size (default: the run's eval_batch_size)")
    p.add_argument("--no_tensorboard", action="store_true", help="do not write the pictures to TensorBoard")
    return p


def evaluate_main(argv: list[str]) -> int:
    """`hwrjax evaluate`: prints the report, writes it as JSON and the pictures as PNG and TensorBoard images."""

    def body(args: argparse.Namespace) -> int:
        workdirs = evaluate_lib.workdir_list(args.workdir)
        primary = check_run_workdir(workdirs[0])
        stem = evaluate_lib.report_stem(args.split, len(workdirs), args.tta, args.checkpoint)
        default_output = storage.join(primary, evaluate_lib.REPORT_DIR, f"{stem}_metrics.json")
        output = args.output or default_output
        check_writable(os.path.dirname(storage.absolute(output)))
        picture_dir, tensorboard = storage.join(primary, evaluate_lib.REPORT_DIR), not args.no_tensorboard
        if args.output and writable_at(picture_dir) is not None:
            # A read-only workdir: everything goes beside --output, TensorBoard images are left out.
            picture_dir, tensorboard = os.path.dirname(storage.absolute(output)), False
        check_writable(picture_dir)

        result = evaluate_lib.run_evaluation(workdirs, split=args.split, tta=args.tta, which=args.checkpoint,
                                             batch_size=args.batch_size)
        report = result.report
        saved = dict(report)
        if output == default_output and storage.exists(output):
            # Evaluating the run's own test split adds detail to the training's test_metrics.json
            # and keeps what only training knows (wall time, parameter count, best validation).
            try:
                previous = json.loads(storage.read_bytes(output))
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                previous = {}
            if isinstance(previous, dict):
                saved = {**{k: v for k, v in previous.items() if k not in report}, **report}
        storage.write_json_atomic(output, saved)
        pictures = evaluate_lib.write_pictures(primary, evaluate_lib.read_history(primary), result.predictions, report, stem=stem,
                                               step=report["checkpoint_steps"][0], tensorboard=tensorboard,
                                               picture_dir=picture_dir)
        what = f"ensemble of {len(workdirs)}" if len(workdirs) > 1 else primary
        tta = f", TTA {args.tta} views" if args.tta > 1 else ""
        lines = [f"{report['dataset']} {report['split']}: {what} (checkpoint {args.checkpoint}, steps "
                 f"{report['checkpoint_steps']}{tta}; probabilities: {report['probabilities']})",
                 metrics_lib.format_report(report), "",
                 evaluate_lib.format_calibration(report, workdirs)]
        if "unreadable" in report:
            lines += ["", f"{report['num_examples']} of {report['files_listed']} image files read; "
                          f"{len(report['unreadable'])} unreadable, {len(report['skipped'])} other entries skipped"]
            for key, what, why in (("unreadable", "unreadable", "error"), ("skipped", "skipped", "reason")):
                entries = report[key]
                lines += [f"  {what}: {e['path']}: {e[why]}" for e in entries[:evaluate_lib.NUM_FILES_LISTED]]
                if len(entries) > evaluate_lib.NUM_FILES_LISTED:
                    lines.append(f"  ... and {len(entries) - evaluate_lib.NUM_FILES_LISTED} more {what} (all in the JSON report)")
        lines += ["", f"report: {output}"]
        lines += [f"{name}: {path}" for name, path in pictures.items()]
        sys.stdout.write("\n".join(lines) + "\n")
        return 0

    return run_command(_evaluate_parser(), argv, body)


def calibrate_main(argv: list[str]) -> int:
    """`hwrjax calibrate`: fits a run's temperature on its validation split and stores it with the run."""
    parser = ArgumentParser(prog="hwrjax calibrate",
                            description="Fit the temperature that calibrates a run's probabilities (on its "
                                        "validation split) and store it in WORKDIR/calibration.json.")
    parser.add_argument("--workdir", required=True, help="workdir of a training run")
    parser.add_checkpoint()
    parser.add_argument("--batch_size", type=int, default=None,
                        help="inference batch size (default: the run's eval_batch_size)")

    def body(args: argparse.Namespace) -> int:
        check_writable(check_run_workdir(args.workdir))
        r = evaluate_lib.calibrate(args.workdir, args.checkpoint, args.batch_size)
        sys.stdout.write(
            f"temperature {r['temperature']:.4g} for step {r['step']} of {args.workdir}, fitted on {r['fitted_on']} "
            f"({r['num_examples']} examples, accuracy {r['accuracy']:.4%})\n"
            f"  NLL {r['nll_before']:.4f} -> {r['nll_after']:.4f}, ECE ({r['num_ece_bins']} bins) "
            f"{r['ece_before']:.4f} -> {r['ece_after']:.4f}\n"
            f"stored in {r['path']}\n")
        return 0

    return run_command(parser, argv, body)


def compare_main(argv: list[str]) -> int:
    """`hwrjax compare DIR [DIR ...]`: prints a side-by-side table of training runs."""
    parser = ArgumentParser(prog="hwrjax compare", description="A side-by-side table of training runs.")
    parser.add_argument("workdirs", nargs="+", metavar="DIR", help="workdirs of training runs")

    def body(args: argparse.Namespace) -> int:
        for w in args.workdirs:
            markers = ("config.json", "metrics.jsonl", os.path.join(evaluate_lib.REPORT_DIR, "test_metrics.json"))
            if not storage.is_dir(w) or not any(storage.exists(storage.join(w, m)) for m in markers):
                raise CheckpointError(f"{w} is not a training workdir (no config.json, metrics.jsonl or "
                                      "report/test_metrics.json); pass directories given to launch.py --workdir")
        table = metrics_lib.compare_table([evaluate_lib.summarize_run(w) for w in args.workdirs])
        sys.stdout.write(table + "\n")
        return 0

    return run_command(parser, argv, body)
