"""`hwrjax predict`: reads digits and numbers from image files or labelled folders, as a table, CSV or JSON."""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import sys
from typing import Any

from hwrjax.apps import labelled
from hwrjax.apps.recognize import (MODES, PreparePool, PreparePoolError, Reading, Recognizer, check_min_confidence,
                                   find_images, prepare_batch)
from hwrjax.cli.toolkit import ArgumentParser, error_line, run_command
from hwrjax.inference.loader import load_model


def _row(path: str, reading: Reading, label: int | None = None) -> dict[str, Any]:
    row = {"path": path, "text": reading.text, "digits": reading.digits,
           "probability": None if reading.probability is None else round(reading.probability, 6),
           "probabilities": [round(p, 6) for p in reading.probabilities], "unsure": reading.unsure,
           "time_ms": round(reading.latency_ms, 2), "error": reading.error}
    if label is not None:
        row["label"] = label
        row["correct"] = None if reading.error else reading.text == str(label)
    return row


def _mark(row: dict[str, Any]) -> str:
    """The text column's cell: the digits, and '?' after them when the reading is unsure."""
    return row["text"] + ("?" if row["unsure"] else "")


def _format_rows(rows: list[dict[str, Any]], fmt: str) -> str:
    labelled = bool(rows) and "label" in rows[0]
    if fmt == "json":
        return json.dumps(rows, indent=1) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        extra = ["label", "correct"] if labelled else []
        writer.writerow(["path", "text", *extra, "probability", "probabilities", "unsure", "time_ms", "error"])
        for r in rows:
            cells = [str(r["label"]), "" if r["correct"] is None else str(r["correct"]).lower()] if labelled else []
            writer.writerow([r["path"], r["text"], *cells,
                             "" if r["probability"] is None else f"{r['probability']:.6f}",
                             " ".join(f"{p:.6f}" for p in r["probabilities"]), str(r["unsure"]).lower(),
                             f"{r['time_ms']:.2f}", r["error"] or ""])
        return buf.getvalue()
    extra = ["label", "right"] if labelled else []
    header = ["path", "text", *extra, "prob", "ms", "error"]
    right = {True: "yes", False: "NO", None: "-"}
    table = [[r["path"], _mark(r), *([str(r["label"]), right[r["correct"]]] if labelled else []),
              "" if r["probability"] is None else f"{r['probability']:.4f}", f"{r['time_ms']:.1f}",
              r["error"] or ""] for r in rows]
    widths = [max(len(header[i]), *(len(t[i]) for t in table)) for i in range(len(header) - 1)]
    lines = []
    for cells in [header] + table:
        line = "  ".join(c.ljust(w) for c, w in zip(cells, widths)) + "  " + cells[-1]
        lines.append(line.rstrip())
    return "\n".join(lines) + "\n"


def summarize_rows(rows: list[dict[str, Any]], min_confidence: float) -> dict[str, Any]:
    """Counts of a predict run: files, read, unreadable, unsure; with labels, also correct and accuracy
    (of all readings, and of the sure ones)."""
    read = [r for r in rows if r["error"] is None]
    sure = [r for r in read if not r["unsure"]]
    summary: dict[str, Any] = {"files": len(rows), "read": len(read), "unreadable": len(rows) - len(read),
                               "min_confidence": min_confidence, "unsure": len(read) - len(sure)}
    if rows and "label" in rows[0]:
        correct = sum(bool(r["correct"]) for r in read)
        summary.update(correct=correct, accuracy=correct / len(read) if read else None,
                       sure_correct=sum(bool(r["correct"]) for r in sure),
                       sure_accuracy=sum(bool(r["correct"]) for r in sure) / len(sure) if sure else None)
    return summary


def _format_summary(summary: dict[str, Any]) -> str:
    parts = [f"{summary['read']} of {summary['files']} images read"]
    if "accuracy" in summary:
        acc = "-" if summary["accuracy"] is None else f"{summary['accuracy']:.2%}"
        parts.append(f"{summary['correct']} right (accuracy {acc})")
    if summary["min_confidence"] > 0:
        kept = summary["read"] - summary["unsure"]
        sure = f"{kept} sure (confidence >= {summary['min_confidence']:g}), {summary['unsure']} unsure (marked ?)"
        if summary.get("sure_accuracy") is not None:
            sure += f"; accuracy of the sure ones {summary['sure_accuracy']:.2%}"
        parts.append(sure)
    return "summary: " + ", ".join(parts) + "\n"


def _probability(text: str) -> float:
    try:
        return check_min_confidence(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None


# Images are prepared in worker processes from this many on: below it, starting them (a fork server
# importing the library, ~2 s of CPU) costs more than they save.
POOL_MIN_IMAGES = 1000
MAX_WORKERS = 64


def default_workers(images: int) -> int:
    """Worker processes `hwrjax predict` uses for `images` images: one per usable core, or 0 for few images."""
    if images < POOL_MIN_IMAGES:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cores, MAX_WORKERS)


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="hwrjax predict",
        description="Read handwritten digits or numbers from image files (PNG, JPEG, BMP, ...) or folders of them.",
        epilog="Exit status: 0 if at least one image was read, 1 if none could be (or a preprocessing worker died), "
               "2 for bad options or workdir.")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    parser.add_argument("--workdir", required=True, help="workdir of a training run")
    parser.add_checkpoint()
    parser.add_argument("--mode", choices=MODES, default=None,
                        help="number: split into digits and read them all (default); digit: one digit per image "
                             "(default with --labelled)")
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output format")
    parser.add_argument("--batch-size", type=int, default=64, help="images read per model call (default 64)")
    parser.add_argument("--min-confidence", type=_probability, default=0.0,
                        help="mark a reading unsure when a digit's calibrated probability is below this (0..1; "
                             "default 0: never); the digits are still given")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes that preprocess images while this one runs the model (default: one per "
                             f"core for {POOL_MIN_IMAGES:,} images or more, else 0: everything in this process)")
    parser.add_argument("--labelled", action="store_true",
                        help="each PATH is a folder of labelled images (sub-folders 0..9 named after their digit): "
                             "rows give the label and whether the reading was right, then a summary")
    return parser


def predict_main(argv: list[str]) -> int:
    """`hwrjax predict`: reads digits from image files; exit 0 if any image was read, 1 if none, 2 on usage errors."""
    parser = _parser()
    return run_command(parser, argv, lambda args: _predict(parser, args), command=parser.prog)


def _predict(parser: ArgumentParser, args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.workers is not None and not 0 <= args.workers <= MAX_WORKERS:
        parser.error(f"--workers must be in 0..{MAX_WORKERS}")
    mode = args.mode or ("digit" if args.labelled else "number")
    if args.labelled:
        scans = [labelled.scan_labelled_folder(p) for p in args.paths]
        items = [(path, None, label) for scan in scans for path, label in zip(scan.paths, scan.labels.tolist())]
        items += [(path, f"skipped: {why}", None) for scan in scans for path, why in scan.skipped]
    else:
        items = [(path, error, None) for path, error in find_images(args.paths)]
    chunks = [items[start:start + args.batch_size] for start in range(0, len(items), args.batch_size)]
    batches = [[path for path, error, _ in chunk if error is None] for chunk in chunks]
    workers = default_workers(sum(map(len, batches))) if args.workers is None else args.workers
    # Started before the model loads, so that the workers' start-up overlaps it.
    with PreparePool(workers, mode) if workers else contextlib.nullcontext() as pool:
        recognizer = Recognizer.from_loaded(load_model(args.workdir, args.checkpoint),
                                            min_confidence=args.min_confidence)
        if not recognizer.calibrated:
            sys.stderr.write(f"hwrjax predict: note: {args.workdir} has no fitted temperature for step "
                             f"{recognizer.step}; probabilities are uncalibrated (T=1) (fit one with `hwrjax "
                             f"calibrate --workdir={args.workdir}`)\n")
        rows: list[dict[str, Any]] = []
        try:
            prepared_batches = pool.map(batches) if pool is not None else (
                prepare_batch(batch, mode, recognizer.max_digits) for batch in batches)
            for chunk, prepared in zip(chunks, prepared_batches):
                readings = iter(recognizer.read_prepared(prepared))
                for path, error, label in chunk:
                    if error is not None and label is None and args.labelled:
                        continue  # skipped entries of a labelled folder are listed after the table
                    reading = Reading("", [], [], [], 0.0, error) if error else next(readings)
                    rows.append(_row(path, reading, label if args.labelled else None))
        except PreparePoolError as e:
            sys.stderr.write(error_line(e, parser.prog))
            return 1
    summary = summarize_rows(rows, args.min_confidence)
    if args.labelled:
        summary["skipped"] = [{"path": path, "reason": why[len("skipped: "):]} for path, why, label in items
                              if label is None]
    if args.format == "json" and args.labelled:
        sys.stdout.write(json.dumps({"rows": rows, "summary": summary}, indent=1) + "\n")
    else:
        sys.stdout.write(_format_rows(rows, args.format))
        if args.labelled or args.min_confidence > 0:
            (sys.stderr if args.format != "table" else sys.stdout).write(_format_summary(summary))
        for skipped in summary.get("skipped", []):
            sys.stderr.write(f"hwrjax predict: skipped {skipped['path']}: {skipped['reason']}\n")
    return 0 if any(r["error"] is None for r in rows) else 1
