"""Tests for hwrjax.apps.recognize: the Recognizer API and `hwrjax predict`.

The model is untrained (tests/conftest.py), so these check behaviour, not accuracy:
a 28x28 MNIST-form array must get exactly the model's own argmax, a number of k digits
must give k digits, bad inputs must give per-item errors, and each batch-size bucket
must compile once.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import make_workdir
from hwrjax.apps import preprocess
from hwrjax.apps.recognize import PreparePool, PreparePoolError, Reading, Recognizer, find_images, prepare_batch
from hwrjax.cli import predict as cli_predict
from hwrjax.cli.predict import POOL_MIN_IMAGES, default_workers, predict_main
from hwrjax.core.errors import CheckpointError
from hwrjax.training.checkpoint import load_config
from tests.support import synth

# Strokes of a few glyphs in a 112x112 box (4x a 28x28 MNIST field, digit ~20 px tall there).
_GLYPHS = {
    1: [[(58, 16), (52, 96)]],
    7: [[(30, 18), (84, 18), (48, 96)]],
    4: [[(72, 96), (72, 16), (28, 70), (88, 70)]],
    0: "ellipse",
}


def draw_digit(digit: int, width: int = 10) -> np.ndarray:
    """A 28x28 uint8 MNIST-style digit (white on black), drawn at 4x and area-downscaled."""
    im = Image.new("L", (112, 112), 0)
    draw = ImageDraw.Draw(im)
    spec = _GLYPHS[digit]
    if spec == "ellipse":
        draw.ellipse((32, 16, 80, 96), outline=255, width=width)
    else:
        for line in spec:
            draw.line(line, fill=255, width=width, joint="curve")
    return np.asarray(im.resize((28, 28), Image.Resampling.BOX))


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def drawn_number(digits: list[int], height: int = 120) -> np.ndarray:
    """Dark ink on white, like a canvas drawing: glyphs side by side with clear gaps."""
    im = Image.new("L", (len(digits) * height + height // 2, height + 40), 255)
    draw = ImageDraw.Draw(im)
    s = height / 112
    for i, d in enumerate(digits):
        x0, y0 = height // 4 + i * height, 20
        spec = _GLYPHS[d]
        if spec == "ellipse":
            draw.ellipse((x0 + 32 * s, y0 + 16 * s, x0 + 80 * s, y0 + 96 * s), outline=20, width=9)
        else:
            for line in spec:
                draw.line([(x0 + x * s, y0 + y * s) for x, y in line], fill=20, width=9, joint="curve")
    return np.asarray(im)


def shared_untrained_workdir(tmp_path_factory) -> str:
    """One untrained workdir for the whole session (test_serve and test_browser reuse it)."""
    path = tmp_path_factory.getbasetemp() / "untrained_run"
    if not (path / "READY").exists():
        make_workdir(str(path))
        (path / "READY").touch()
    return str(path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return shared_untrained_workdir(tmp_path_factory)


@pytest.fixture(scope="module")
def recognizer(workdir):
    return Recognizer.from_workdir(workdir)


def model_probs(rec: Recognizer, crops: np.ndarray) -> np.ndarray:
    """The model's own softmax on [N, 28, 28] float crops, without the Recognizer's batching."""
    logits = rec.model.apply(rec.variables, np.asarray(crops, np.float32)[..., None], train=False)
    return np.asarray(jax.nn.softmax(logits, axis=-1))


def test_mnist_form_arrays_get_the_models_own_argmax(recognizer):
    arrays = [draw_digit(d) for d in (0, 1, 4)]
    arrays += [draw_digit(d, width) for d, width in ((0, 6), (1, 16), (4, 5))]  # spread the untrained outputs
    floats = np.stack([a.astype(np.float32) / 255.0 for a in arrays])
    assert all(preprocess.is_mnist_form(f) for f in floats)
    want = model_probs(recognizer, floats)
    for mode in ("digit", "number"):
        readings = recognizer.recognize(arrays, mode=mode)
        assert [r.digits for r in readings] == [[int(i)] for i in want.argmax(-1)]
        for r, p in zip(readings, want):
            assert r.error is None
            assert r.text == str(r.digits[0])
            np.testing.assert_allclose(r.probs[0], p, atol=1e-5)
            assert r.probabilities[0] == pytest.approx(float(p.max()), abs=1e-5)
    # (28, 28, 1) and float 0..1 forms read the same as uint8.
    again = recognizer.recognize([floats[0][..., None], floats[0]])
    assert again[0].digits == again[1].digits == [int(want[0].argmax())]


def test_a_28x28_array_not_in_mnist_form_reads_like_the_same_pixels_in_a_file(recognizer):
    # Dark ink on white, or off centre: a user's own 28x28 image, not an MNIST digit. Taken as it is
    # it would be read wrong (inverted, or out of place); it goes through the preprocessing as a file does.
    dark, off_centre = 255 - draw_digit(4), draw_digit(7)
    for array in (dark, off_centre):
        assert not preprocess.is_mnist_form(array.astype(np.float32) / 255.0)
        (from_array,) = recognizer.recognize([array], mode="digit")
        (from_file,) = recognizer.recognize([png_bytes(array)], mode="digit")
        assert from_array.error is None and from_array.digits == from_file.digits
        np.testing.assert_allclose(from_array.probs, from_file.probs, atol=1e-6)
        want = model_probs(recognizer, preprocess.to_mnist(array)[None])[0]
        np.testing.assert_allclose(from_array.probs[0], want, atol=1e-5)
    noise = (np.random.default_rng(0).random((28, 28)) * 255).astype(np.uint8)
    (r,) = recognizer.recognize([noise], mode="digit")
    assert r.digits == [] and "noise" in r.error


def test_reading_fields_for_a_photo(recognizer):
    photo = synth.render_photo(draw_digit(7), np.random.default_rng(1), rgb=True)
    (r,) = recognizer.recognize([photo], mode="digit")
    assert isinstance(r, Reading) and r.error is None
    assert len(r.digits) == len(r.probabilities) == len(r.probs) == 1
    assert r.text == str(r.digits[0]) and 0 <= r.digits[0] <= 9
    assert len(r.probs[0]) == 10 and sum(r.probs[0]) == pytest.approx(1.0, abs=1e-4)
    assert r.probabilities[0] == pytest.approx(max(r.probs[0]))
    assert r.probability == r.probabilities[0]
    assert r.latency_ms > 0
    assert json.loads(json.dumps(r.to_dict()))["text"] == r.text


@pytest.mark.parametrize("digits", [[1, 7], [4, 0, 7], [7, 1, 4, 0, 1]])
def test_number_photo_of_k_digits_gives_k_digits_in_one_model_call(recognizer, digits, monkeypatch):
    rng = np.random.default_rng(len(digits))
    photo = synth.render_number([draw_digit(d) for d in digits], rng, gap=(5.0, 7.0), touch_prob=0.0)
    calls = []
    predict = recognizer._predict
    monkeypatch.setattr(recognizer, "_predict", lambda v, x: calls.append(x.shape) or predict(v, x))
    (r,) = recognizer.recognize([photo])
    assert r.error is None
    assert len(r.digits) == len(digits) == len(r.text) == len(r.probabilities)
    assert calls == [(recognizer.bucket(len(digits)), 28, 28, 1)]
    # The same crops read one by one get the same digits: batching and padding change nothing.
    crops = recognizer.prepare(photo, "number")
    assert [int(recognizer.classify(c[None]).argmax()) for c in crops] == r.digits


def test_a_batch_classifies_every_crop_at_once(recognizer, monkeypatch):
    inputs = [drawn_number([1, 4]), png_bytes(draw_digit(0)), draw_digit(7), drawn_number([7, 0, 1])]
    calls = []
    predict = recognizer._predict
    monkeypatch.setattr(recognizer, "_predict", lambda v, x: calls.append(x.shape[0]) or predict(v, x))
    readings = recognizer.recognize(inputs)
    assert [len(r.digits) for r in readings] == [2, 1, 1, 3]
    assert calls == [8]  # 7 crops padded to the bucket of 8


def test_digit_mode_reads_one_digit_from_a_number(recognizer):
    image = drawn_number([4, 1])
    assert len(recognizer.recognize([image], mode="number")[0].digits) == 2
    assert len(recognizer.recognize([image], mode="digit")[0].digits) == 1
    with pytest.raises(ValueError, match="mode"):
        recognizer.recognize([image], mode="letters")


def test_bad_inputs_get_errors_and_the_batch_goes_on(recognizer, tmp_path):
    good = png_bytes(255 - drawn_number([1, 7]))  # light ink on dark works too
    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image")
    inputs = [
        good,
        b"definitely not an image",
        b"",
        str(tmp_path / "missing.png"),
        str(text_file),
        np.full((60, 80), 255, np.uint8),  # blank paper: no ink
        np.zeros((2, 3, 4, 5)),  # not an image shape
        np.full((28, 28), np.nan, np.float32),
        draw_digit(4),
    ]
    readings = recognizer.recognize(inputs)
    assert len(readings) == len(inputs)
    ok = [r.error is None for r in readings]
    assert ok == [True, False, False, False, False, False, False, False, True]
    for r in readings:
        if r.error is not None:
            assert r.text == "" and r.digits == [] and "\n" not in r.error and r.error
    assert len(readings[0].digits) == 2
    assert "not an image" in readings[1].error
    assert "no such file" in readings[3].error
    assert "no ink" in readings[5].error
    with pytest.raises(Exception):
        recognizer.read(b"definitely not an image")


def test_each_bucket_compiles_once(workdir):
    rec = Recognizer.from_workdir(workdir, max_batch=8)
    assert rec.trace_count == 0
    sizes_and_traces = [(1, 1), (1, 1), (2, 2), (3, 3), (4, 3), (2, 3), (5, 4), (8, 4), (9, 4), (20, 4), (1, 4)]
    for n, traces in sizes_and_traces:
        probs = rec.classify(np.zeros((n, 28, 28), np.float32))
        assert probs.shape == (n, 10)
        assert rec.trace_count == traces, n
    # recognize() on mixed batches reuses the same buckets.
    rec.recognize([draw_digit(1), drawn_number([4, 7])])
    rec.recognize([draw_digit(0)] * 6)
    assert rec.trace_count == 4
    assert [rec.bucket(n) for n in (1, 2, 3, 5, 8, 9, 300)] == [1, 2, 4, 8, 8, 8, 8]


def test_from_workdir_errors(tmp_path, workdir):
    with pytest.raises(CheckpointError, match="does not exist"):
        Recognizer.from_workdir(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        Recognizer.from_workdir(str(tmp_path / "empty"))
    with pytest.raises(CheckpointError, match="best, latest or a step|'best', 'latest'"):
        Recognizer.from_workdir(workdir, checkpoint="newest")
    assert Recognizer.from_workdir(workdir, checkpoint="latest").step == 0
    with pytest.raises(ValueError, match="power of two"):
        Recognizer.from_workdir(workdir, max_batch=12)


# -------------------------------------------------------------------- hwrjax predict


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    Image.fromarray(drawn_number([1, 4, 7])).save(root / "number.png")
    Image.fromarray(synth.render_photo(draw_digit(0), np.random.default_rng(3))).save(root / "sub" / "zero.jpg")
    Image.fromarray(drawn_number([7])).convert("RGB").save(root / "sub" / "seven.bmp")
    (root / "sub" / "readme.txt").write_text("skipped: not an image extension")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return root


def test_find_images_walks_folders(image_folder, tmp_path):
    rows = find_images([str(image_folder), str(tmp_path / "x.png")])
    names = [os.path.relpath(p, image_folder) for p, _ in rows[:-1]]
    assert names == ["broken.png", "number.png", os.path.join("sub", "seven.bmp"), os.path.join("sub", "zero.jpg")]
    assert rows[-1] == (str(tmp_path / "x.png"), None)
    (tmp_path / "nothing").mkdir()
    (path, error), = find_images([str(tmp_path / "nothing")])
    assert "no image files" in error


def test_predict_formats(workdir, image_folder, capsys):
    assert predict_main([f"--workdir={workdir}", "--format=json", str(image_folder)]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {os.path.basename(r["path"]): r for r in rows}
    assert sorted(by_name) == ["broken.png", "number.png", "seven.bmp", "zero.jpg"]
    assert by_name["broken.png"]["error"] and by_name["broken.png"]["text"] == ""
    assert len(by_name["number.png"]["digits"]) == 3 and by_name["number.png"]["error"] is None
    assert by_name["number.png"]["probability"] == pytest.approx(min(by_name["number.png"]["probabilities"]))
    assert all(r["time_ms"] >= 0 for r in rows)

    assert predict_main([f"--workdir={workdir}", "--format=csv", "--mode=digit", "--batch-size=2",
                         str(image_folder)]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [os.path.basename(r["path"]) for r in table] == ["broken.png", "number.png", "seven.bmp", "zero.jpg"]
    assert [len(r["text"]) for r in table] == [0, 1, 1, 1]  # digit mode: one digit per image
    assert table[0]["error"] and not table[1]["error"]
    assert float(table[1]["probability"]) == pytest.approx(float(table[1]["probabilities"]), abs=1e-6)

    assert predict_main([f"--workdir={workdir}", str(image_folder / "number.png")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["path", "text", "prob", "ms", "error"]
    assert out[1].startswith(str(image_folder / "number.png")) and len(out) == 2


def test_predict_exit_codes(workdir, image_folder, tmp_path, capsys):
    assert predict_main([f"--workdir={workdir}", "--format=json", str(image_folder / "broken.png"),
                         str(tmp_path / "missing.png")]) == 1
    rows = json.loads(capsys.readouterr().out)
    assert [bool(r["error"]) for r in rows] == [True, True]
    assert predict_main([f"--workdir={tmp_path / 'nowhere'}", str(image_folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
    assert predict_main([f"--workdir={workdir}", "--format=xml", str(image_folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--format" in err


def test_predict_command_in_a_subprocess(workdir, image_folder):
    exe = os.path.join(os.path.dirname(sys.executable), "hwrjax")
    assert os.path.exists(exe), "install the package (pip install -e .) to get the hwrjax command"
    proc = subprocess.run([exe, "predict", f"--workdir={workdir}", "--format=json",
                           str(image_folder / "number.png"), str(image_folder / "broken.png")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert len(rows[0]["digits"]) == 3 and rows[0]["error"] is None
    assert rows[1]["error"]


def test_a_checkpoint_that_does_not_match_its_config_is_refused(tmp_path, workdir):
    bad = tmp_path / "mismatch"
    shutil.copytree(workdir, bad)
    config = load_config(workdir)
    config.model.stem_width = 12
    (bad / "config.json").write_text(config.to_json())
    with pytest.raises(CheckpointError, match="does not match its config.json"):
        Recognizer.from_workdir(str(bad))


# ----------------------------------------------------------------------------- worker processes


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """Digits, numbers and unreadable files in several captures, for comparing the pool with one process."""
    root = tmp_path_factory.mktemp("mixed")
    images = [draw_digit(1), 255 - draw_digit(7), drawn_number([4, 0]), draw_digit(4, width=14),
              np.kron(255 - draw_digit(0), np.ones((3, 3), np.uint8)), drawn_number([7, 1, 4]),
              np.full((30, 30), 255, np.uint8), 255 - draw_digit(1)]
    for i, image in enumerate(images):
        Image.fromarray(image).save(root / f"{i:02d}.png")
    (root / "03b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return root


def test_worker_processes_read_like_one_process(workdir, mixed_folder, capsys):
    args = [f"--workdir={workdir}", "--format=json", "--batch-size=2", str(mixed_folder)]
    assert predict_main(args + ["--workers=0"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert predict_main(args + ["--workers=2"]) == 0
    pooled = json.loads(capsys.readouterr().out)

    def without_times(rows):
        return [{k: v for k, v in row.items() if k != "time_ms"} for row in rows]

    assert without_times(pooled) == without_times(alone)  # the same readings, in the same order
    assert [os.path.basename(r["path"]) for r in pooled] == sorted(os.listdir(mixed_folder))
    errors = {os.path.basename(r["path"]): r["error"] for r in pooled}
    assert "03b.png" in errors and errors.pop("03b.png")  # the broken file is refused ...
    assert errors.pop("06.png").startswith("no ink")  # ... and so is blank paper,
    assert not any(errors.values())  # and every other file is read
    assert [len(r["digits"]) for r in pooled if r["path"].endswith(("02.png", "05.png"))] == [2, 3]


class _ExitWhenUnpickled:
    """An input whose unpickling ends the process reading it: a worker that dies mid-batch."""

    def __reduce__(self):
        return os._exit, (3,)


def test_workers_prepare_like_this_process_in_order_and_a_dead_one_is_a_clear_error(mixed_folder):
    files = [str(p) for p in sorted(mixed_folder.iterdir())]
    batches = [files[i:i + 2] for i in range(0, len(files), 2)] + [[]]
    with PreparePool(2, "number") as pool:
        assert pool.wait_ready(timeout=300), "the workers did not start"
        pooled = list(pool.map(batches))
        alone = [prepare_batch(batch, "number") for batch in batches]
        assert len(pooled) == len(alone) == len(batches) and pooled[-1] == []
        for got, want in zip(pooled, alone):
            assert [(e, None if c is None else c.tolist()) for c, e, _ in got] == \
                [(e, None if c is None else c.tolist()) for c, e, _ in want]
        with pytest.raises(PreparePoolError, match=r"worker process died .* \(hwrjax predict --workers=0\)"):
            list(pool.map([[files[0]], [_ExitWhenUnpickled()], [files[1]]]))


def test_predict_reports_a_dead_worker_in_one_line(workdir, mixed_folder, capsys, monkeypatch):
    class DyingPool:
        def __init__(self, workers, mode):
            self.workers = workers

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def map(self, batches):
            raise PreparePoolError("a preprocessing worker process died while reading a batch; read in one "
                                   "process instead (hwrjax predict --workers=0)")
            yield

    monkeypatch.setattr(cli_predict, "PreparePool", DyingPool)
    assert predict_main([f"--workdir={workdir}", "--workers=2", str(mixed_folder)]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("hwrjax predict: error: a preprocessing worker process died")


def test_few_images_are_prepared_in_this_process():
    assert default_workers(POOL_MIN_IMAGES - 1) == 0 and default_workers(0) == 0
    assert 1 <= default_workers(POOL_MIN_IMAGES) <= (os.cpu_count() or 1)
    with pytest.raises(ValueError, match="workers"):
        PreparePool(0)
