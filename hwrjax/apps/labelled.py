"""A folder of labelled images as a split: FOLDER/<digit>/<image>, one sub-folder per class.

    scan = scan_labelled_folder("my_digits/")      # bounded listing, no image read yet
    split = read_labelled_folder(scan)              # each file as the Recognizer reads it in digit mode

`hwrjax evaluate --split=FOLDER` and `hwrjax predict --labelled FOLDER` read a user's own
handwriting this way. The listing is bounded before any image is decoded: at most
`max_files` entries are looked at, and each image file at most `max_file_bytes` large (a
one-line error names the limit otherwise). Entries that cannot be a labelled image (a file
outside the class folders, a sub-folder not named after a class, a file without an image
extension, a device, pipe or socket) are skipped with the reason, never silently.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from typing import Any

import numpy as np

from hwrjax.apps.recognize import IMAGE_EXTENSIONS, prepare_image
from hwrjax.core.errors import DataError, HwrjaxError

__all__ = ["MAX_FILES", "MAX_FILE_BYTES", "LabelledFolder", "LabelledSplit", "read_labelled_folder",
           "scan_labelled_folder"]

# Entries (files and folders) looked at in one labelled folder: a few hand-collected sets fit many times.
MAX_FILES = 100_000
# Largest image file read: a phone photo fits (as in `hwrjax serve`).
MAX_FILE_BYTES = 16 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class LabelledFolder:
    """The image files of a labelled folder, in sorted order, with their labels, and what was skipped."""

    folder: str
    paths: tuple[str, ...]
    labels: np.ndarray  # int32 [N]
    skipped: tuple[tuple[str, str], ...]  # (path, why) of entries not read

    def __len__(self) -> int:
        return len(self.paths)


@dataclasses.dataclass(frozen=True)
class LabelledSplit:
    """MNIST-form images [N, 28, 28, 1] (float32 in [0, 1]) and labels [N] of the readable files."""

    images: np.ndarray
    labels: np.ndarray
    paths: tuple[str, ...]
    unreadable: tuple[tuple[str, str], ...]  # (path, error) of image files that could not be read
    skipped: tuple[tuple[str, str], ...]


def _check_limit(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DataError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def scan_labelled_folder(folder: str, num_classes: int = 10, max_files: int = MAX_FILES,
                         max_file_bytes: int = MAX_FILE_BYTES) -> LabelledFolder:
    """Lists FOLDER/<class>/**/<image> (class folders named 0..num_classes-1); raises DataError when
    the folder is missing, holds no image, holds more than `max_files` entries or a too-large image."""
    max_files = _check_limit(max_files, "max_files")
    max_file_bytes = _check_limit(max_file_bytes, "max_file_bytes")
    folder = os.path.abspath(os.path.expanduser(os.fspath(folder)))
    if not os.path.isdir(folder):
        raise DataError(f"{folder} is not a folder; pass a folder holding sub-folders 0..{num_classes - 1} of images")
    names = {str(c): c for c in range(num_classes)}
    seen = 0

    def count(path: str) -> None:
        nonlocal seen
        seen += 1
        if seen > max_files:
            raise DataError(f"{folder} holds more than {max_files:,} files and folders; read at most that many "
                            f"at once (split it into several folders)")

    paths: list[str] = []
    labels: list[int] = []
    skipped: list[tuple[str, str]] = []
    with os.scandir(folder) as it:
        top = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    for entry in top:
        count(entry.path)
        if entry.name not in names or not entry.is_dir(follow_symlinks=True):
            why = ("not in a class folder" if not entry.is_dir(follow_symlinks=True) else "not a class folder")
            skipped.append((entry.path, f"{why}; images go in sub-folders named 0..{num_classes - 1} after "
                                        "their digit"))
            continue
        label = names[entry.name]
        for root, dirs, files in os.walk(entry.path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for d in dirs:
                count(os.path.join(root, d))
            for name in sorted(f for f in files if not f.startswith(".")):
                path = os.path.join(root, name)
                count(path)
                if not name.lower().endswith(IMAGE_EXTENSIONS):
                    skipped.append((path, f"not an image file ({', '.join(IMAGE_EXTENSIONS)})"))
                    continue
                try:
                    info = os.stat(path)
                except OSError as e:
                    skipped.append((path, f"cannot be read ({e.strerror})"))
                    continue
                if not stat.S_ISREG(info.st_mode):
                    skipped.append((path, "not a regular file"))
                    continue
                if info.st_size > max_file_bytes:
                    raise DataError(f"{path} is {info.st_size:,} bytes, over the {max_file_bytes:,}-byte limit of "
                                    "one labelled image; shrink it or move it out of the folder")
                paths.append(path)
                labels.append(label)
    if not paths:
        raise DataError(f"{folder} holds no image files in sub-folders 0..{num_classes - 1}; put each digit's "
                        "images in the sub-folder named after it")
    return LabelledFolder(folder=folder, paths=tuple(paths), labels=np.asarray(labels, np.int32),
                          skipped=tuple(skipped))


def read_labelled_folder(scan: LabelledFolder) -> LabelledSplit:
    """Reads every listed file through the Recognizer's own preprocessing in digit mode
    (`hwrjax.apps.recognize.prepare_image`); files it cannot read are listed as unreadable with the
    one-line reason."""
    images, labels, paths, unreadable = [], [], [], []
    for path, label in zip(scan.paths, scan.labels.tolist()):
        try:
            crop = prepare_image(path, mode="digit")
        except (HwrjaxError, OSError) as e:  # preprocess.ImageError is a HwrjaxError
            unreadable.append((path, str(e)))
            continue
        images.append(np.asarray(crop, np.float32).reshape(28, 28, 1))
        labels.append(label)
        paths.append(path)
    stacked = np.stack(images) if images else np.zeros((0, 28, 28, 1), np.float32)
    return LabelledSplit(images=np.clip(stacked, 0.0, 1.0), labels=np.asarray(labels, np.int32),
                         paths=tuple(paths), unreadable=tuple(unreadable), skipped=scan.skipped)
