"""Hand-planted realistic bugs, and which tests catch each (a mutation check of the suite).

Each mutant replaces one exact piece of the library's source with a buggy version, in a copy of
the project in a temporary folder, and runs the tests chosen for it there; the mutant is caught
when they fail. The copy can be of an older git revision (code and tests), to compare the
suite before and after a change:

  python tests/mutants/mutants.py                    # every mutant, in the working tree
  python tests/mutants/mutants.py --rev=454001f      # the same bugs planted in an older revision
  python tests/mutants/mutants.py --only=eval_raw_pixels,loader_raw_weights_reset_bn

Needs TFDS_DATA_DIR (the tests that catch most of these train on MNIST). A mutant whose
source text is no longer found (the code moved on) is reported as "stale", not as caught.
Prints a Markdown table; nothing is written outside the temporary folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAINED_RUN_ENV = "HWRJAX_TEST_TRAINED_RUN"  # tests/conftest.py's hook


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    what: str  # the bug, as a user would meet it
    path: str  # file under the project root
    old: str  # exact source text, found once
    new: str
    tests: tuple[str, ...]  # pytest ids (files or nodes) that should catch it
    older: tuple[tuple[str, str], ...] = ()  # (old, new) of the same bug in older versions of the code

    @property
    def changes_training(self) -> bool:
        """Whether the session's trained run (tests/conftest.py) could come out different."""
        return self.path.startswith(("hwrjax/core/", "hwrjax/models/")) or self.path in (
            "hwrjax/training/loop.py", "hwrjax/training/config_checks.py", "hwrjax/training/data.py")


RESUME_TEST = "tests/test_resume.py::test_interrupted_three_ways_ends_bitwise_identical[1]"
EVAL_COUNT_TEST = "tests/test_train.py::test_evaluation_counts_every_example_exactly_once"
PMAP_TESTS = ("tests/test_resume.py::test_pmap_run_killed_and_resumed_is_bitwise_its_own_and_close_to_jit",
              "tests/test_parallel.py")
LOADER_TESTS = ("tests/test_reading.py", "tests/test_evaluate.py", "tests/test_export.py", "tests/test_recognize.py")



def _loader_forms(replacement: str) -> tuple[tuple[str, str], ...]:
    """The loader's "use the moving average" lines replaced, at the indents they have had."""
    forms = []
    for indent in ("        ", "    "):
        old = f'{indent}if average and model.get("ema"):\n{indent}    model = model["ema"]\n'
        new = "".join(indent + line + "\n" for line in replacement.splitlines())
        forms.append((old, new))
    return tuple(forms)


# Initial BatchNorm statistics: means 0, variances 1.
LOADER_RESET_BN = _loader_forms('''if average and model.get("ema"):
    model = dict(model, batch_stats=jax.tree_util.tree_map_with_path(
        lambda p, x: jax.numpy.ones_like(x) if "var" in jax.tree_util.keystr(p) else jax.numpy.zeros_like(x),
        model["batch_stats"]))''')
LOADER_RAW = _loader_forms('''if average and model.get("ema"):
    pass''')

MUTANTS = [
    Mutant("eval_raw_pixels", "hwrjax evaluate feeds 0-255 pixels to the model instead of [0, 1]",
           "hwrjax/inference/predict.py", "        return images.astype(jnp.float32) / 255.0\n",
           "        return images.astype(jnp.float32)\n",
           ("tests/test_evaluate.py",),
           older=(("x = images.astype(jnp.float32) / 255.0", "x = images.astype(jnp.float32)"),)),
    Mutant("loader_raw_weights_reset_bn",
           "every inference loader uses the raw weights, not the moving average, with BatchNorm statistics "
           "reset to their initial values", "hwrjax/training/checkpoint.py",
           *LOADER_RESET_BN[0], LOADER_TESTS, older=LOADER_RESET_BN[1:]),
    Mutant("loader_raw_weights", "inference loaders ignore the moving average (raw weights, their own statistics)",
           "hwrjax/training/checkpoint.py", *LOADER_RAW[0], LOADER_TESTS, older=LOADER_RAW[1:]),
    Mutant("epoch_order_key_off_by_one", "epoch e is shuffled with the key of epoch e + 1",
           "hwrjax/core/steps.py", "return _permutation(jax.random.fold_in(order_key, epoch), num_train)",
           "return _permutation(jax.random.fold_in(order_key, epoch + 1), num_train)",
           ("tests/test_train.py::test_epoch_order_is_a_keyed_permutation",
            "tests/test_train.py::test_input_pipeline_prepares_ahead_exactly_the_batches_of_each_step",
            RESUME_TEST)),
    Mutant("epoch_boundary_off_by_one", "the last batch of each epoch is taken from the next epoch's order",
           "hwrjax/training/loop.py", "        epoch = step // self._steps_per_epoch\n",
           "        epoch = (step + 1) // self._steps_per_epoch\n",
           ("tests/test_train.py::test_input_pipeline_prepares_ahead_exactly_the_batches_of_each_step",)),
    Mutant("eval_drops_last_batch", "validation and test drop the last, partial eval batch",
           "hwrjax/training/loop.py", "self.num_batches = max(1, math.ceil(n / batch_size))",
           "self.num_batches = max(1, n // batch_size)", (EVAL_COUNT_TEST, "tests/test_evaluate.py")),
    Mutant("polarity_inverted", "preprocessing decides the ink polarity the wrong way round",
           "hwrjax/apps/preprocess.py", "    light = lighter > darker\n", "    light = lighter < darker\n",
           ("tests/test_reading.py", "tests/test_preprocess.py"),
           older=(("    return lighter > darker\n", "    return lighter < darker\n"),)),
    Mutant("resume_wrong_step", "resume puts the restored weights at the step after their checkpoint",
           "hwrjax/training/checkpoint.py", 'state = target_state.replace(step=restored["opt"]["step"],',
           'state = target_state.replace(step=restored["opt"]["step"] + 1,', (RESUME_TEST,)),
    Mutant("config_field_unregistered", "a config field added without registering its neutral value: runs "
           "saved before it are refused on resume", "hwrjax/training/config_checks.py",
           '"augment.stretch_prob": 0.0, ', "",
           ("tests/test_train.py::test_a_run_saved_by_an_earlier_version_still_resumes",)),
    Mutant("resume_oldest_checkpoint", "resume restores the oldest kept checkpoint instead of the newest",
           "hwrjax/training/checkpoint.py", "steps = sorted(self.latest.all_steps(), reverse=True)",
           "steps = sorted(self.latest.all_steps())", (RESUME_TEST,)),
    Mutant("eval_ignores_mask", "the padding of the last eval batch is counted in the loss",
           "hwrjax/core/steps.py", '"loss_sum": jnp.sum(loss_fn(logits, batch["label"]) * mask),',
           '"loss_sum": jnp.sum(loss_fn(logits, batch["label"])) * jnp.max(mask),', (EVAL_COUNT_TEST,)),
    Mutant("predict_drops_last_batch", "hwrjax evaluate's predictions skip a last partial batch",
           "hwrjax/inference/predict.py", "    for start in range(0, n, batch):",
           "    for start in range(0, n - batch + 1, batch):", ("tests/test_evaluate.py",)),
    Mutant("validation_inside_train", "the validation carve-out is also trained on",
           "hwrjax/training/data.py", "train_end = min(num_train - val, limit) if limit > 0 else num_train - val",
           "train_end = min(num_train, limit) if limit > 0 else num_train",
           ("tests/test_data.py::test_real_mnist_splits",)),
    Mutant("export_raw_weights", "export writes the raw weights instead of the moving average",
           "hwrjax/inference/loader.py", "    variables, step = checkpoint_lib.load_variables(workdir, which)\n",
           "    variables, step = checkpoint_lib.load_variables(workdir, which, average=False)\n",
           ("tests/test_export.py",)),
    Mutant("recognizer_float_rescaled", "the Recognizer divides 0..1 float arrays by 255 again",
           "hwrjax/apps/recognize.py", "    return a / 255.0 if hi > 1.0 else a", "    return a / 255.0",
           ("tests/test_recognize.py", "tests/test_reading.py")),
    Mutant("resume_drops_average", "resume restores the weights but restarts the moving average from them",
           "hwrjax/training/checkpoint.py", '''                ema = model.get("ema")
                if "ema" not in model:''', '''                ema = model.get("ema")
                if True:''', (RESUME_TEST,)),
    Mutant("report_uses_last_not_best", "the final test report scores the last weights, not the best checkpoint",
           "hwrjax/training/loop.py",
           "if val_set is None or meta[\"best_step\"] < 0 or meta[\"best_step\"] == step:",
           "if True:", ("tests/test_ema.py::test_a_run_validates_selects_and_delivers_the_average",
                         "tests/test_multiprocess.py::test_two_processes_train_checkpoint_resume_and_match_one_process")),
    Mutant("pmap_local_batchnorm", "--config.parallel=pmap keeps BatchNorm statistics per device",
           "hwrjax/training/loop.py", "bn_axis_name=PMAP_AXIS if use_pmap else None)",
           "bn_axis_name=None)", PMAP_TESTS),
    Mutant("pmap_epoch_order", "--config.parallel=pmap takes each epoch's order one epoch late",
           "hwrjax/training/loop.py", "            epoch = step_ // steps_per_epoch\n",
           "            epoch = max(0, step_ - 1) // steps_per_epoch\n", PMAP_TESTS),
    Mutant("finetune_cold_start", "hwrjax finetune trains from a fresh init instead of the base run's weights",
           "hwrjax/apps/finetune.py", "init_variables=base.variables,", "init_variables=None,",
           ("tests/test_finetune.py::test_finetune_learns_the_style_and_keeps_mnist",)),
    Mutant("finetune_batches_by_call_count", "a resumed fine-tune takes its batches as if it had just started "
           "(the batch index counts calls in this process, not the step)",
           "hwrjax/apps/finetune.py", "lambda step: batch_fn(\n            user_images, user_labels, ctx.train_images, "
           "ctx.train_labels, np.int32(step)))", "lambda step, calls=iter(range(2**31)): batch_fn(\n            "
           "user_images, user_labels, ctx.train_images, ctx.train_labels, np.int32(next(calls))))",
           ("tests/test_finetune.py::test_finetune_resumes_bit_for_bit",)),
]


def _copy_project(dest: str, rev: str | None) -> None:
    """The working tree (rev None) or the project at git revision `rev`, copied to `dest`."""
    if rev:
        os.makedirs(dest)
        archive = subprocess.run(["git", "-C", ROOT, "archive", rev], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
        return
    ignore = shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", "*.egg-info", ".pytest_cache")
    shutil.copytree(ROOT, dest, ignore=ignore)


# Where the modules of the layered package lived before it (revisions up to the flat hwrjax/).
FORMER_PATHS = {
    "hwrjax/core/steps.py": "hwrjax/train.py", "hwrjax/training/loop.py": "hwrjax/train.py",
    "hwrjax/training/config_checks.py": "hwrjax/train.py", "hwrjax/inference/predict.py": "hwrjax/evaluate.py",
    "hwrjax/inference/loader.py": "hwrjax/evaluate.py", "hwrjax/training/checkpoint.py": "hwrjax/checkpoint.py",
    "hwrjax/training/data.py": "hwrjax/data.py", "hwrjax/apps/preprocess.py": "hwrjax/preprocess.py",
    "hwrjax/apps/recognize.py": "hwrjax/recognize.py",
}


def _apply(dest: str, mutant: Mutant) -> bool:
    """Plants the mutant (its first form whose source text is found exactly once), in its module or,
    in a revision before the layered package, where that module's code lived then."""
    path = os.path.join(dest, mutant.path)
    if not os.path.exists(path) and mutant.path in FORMER_PATHS:
        path = os.path.join(dest, FORMER_PATHS[mutant.path])
    with open(path) as f:
        source = f.read()
    for old, new in [(mutant.old, mutant.new), *mutant.older]:
        if source.count(old) == 1:
            with open(path, "w") as f:
                f.write(source.replace(old, new))
            return True
    return False


def train_once(folder: str, env: dict) -> str:
    """Trains the tests' shared run (conftest.trained_config) with the unmutated code; returns its workdir."""
    dest = os.path.join(folder, "project")
    _copy_project(dest, None)
    workdir = os.path.join(folder, "trained")
    code = ("import sys; sys.path.insert(0, 'tests'); import conftest; import hwrjax; "
            f"hwrjax.train_and_evaluate(conftest.trained_config(), {workdir!r})")
    subprocess.run([sys.executable, "-c", code], cwd=dest, env=dict(env, PYTHONPATH=dest), check=True,
                   capture_output=True)
    shutil.rmtree(dest)
    return workdir


def run(mutant: Mutant, rev: str | None, env: dict, timeout: int) -> tuple[str, str, float]:
    """Returns (outcome, first failing test or note, seconds)."""
    with tempfile.TemporaryDirectory(prefix=f"hwrjax-mutant-{mutant.name}-") as tmp:
        dest = os.path.join(tmp, "project")
        _copy_project(dest, rev)
        if not _apply(dest, mutant):
            return "stale", f"source text not found once in {mutant.path}", 0.0
        tests = [t for t in mutant.tests if os.path.exists(os.path.join(dest, t.split("::")[0]))]
        if tests:  # drop test ids this revision does not have
            listed = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-n", "0",
                                     "-p", "no:cacheprovider", *tests], cwd=dest, env=dict(env, PYTHONPATH=dest),
                                    capture_output=True, text=True)
            tests = [t for t in tests if "::" not in t or t in listed.stdout]
        if not tests:
            return "no tests", "none of its tests exist at this revision", 0.0
        start = time.time()
        try:
            # -n 0: one process (not pyproject's xdist workers), so -x stops at the first failure and
            # only the mutant's few tests are run, in order.
            proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-n", "0",
                                   "-p", "no:cacheprovider", *tests], cwd=dest, env=dict(env, PYTHONPATH=dest),
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout", f"over {timeout} s", time.time() - start
        seconds = time.time() - start
        failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.M)
        if proc.returncode == 0:
            return "NOT caught", "", seconds
        if proc.returncode == 1 or failed:
            return "caught", failed[0] if failed else "", seconds
        return f"error (exit {proc.returncode})", proc.stdout.strip().splitlines()[-1][:120], seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default=None,
                        help="mutate the project at this git revision, tests included (default: the working tree)")
    parser.add_argument("--only", default="", help="comma-separated mutant names (default: all)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per mutant")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only.split(",")]
    if args.list or not chosen:
        for m in MUTANTS:
            print(f"{m.name:30s} {m.what}")
        return 0 if chosen else 2
    if not os.environ.get("TFDS_DATA_DIR"):
        print("set TFDS_DATA_DIR to a tfds data dir holding mnist: most catching tests train on it", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="hwrjax-mutants-cache-") as cache:
        # One compilation and dataset cache for all mutants' runs (removed at the end).
        env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(cache, "jax"),
                   HWRJAX_DATA_CACHE_DIR=os.path.join(cache, "data"))
        env.pop(TRAINED_RUN_ENV, None)
        # Mutants that cannot change training share one trained run instead of each training it.
        trained = train_once(cache, env) if not args.rev and any(not m.changes_training for m in chosen) else None
        rows = []
        for m in chosen:
            mutant_env = dict(env, **{TRAINED_RUN_ENV: trained}) if trained and not m.changes_training else env
            outcome, detail, seconds = run(m, args.rev, mutant_env, args.timeout)
            rows.append((m, outcome, detail, seconds))
            print(f"{m.name}: {outcome} {detail} ({seconds:.0f} s)", file=sys.stderr, flush=True)
    rev = args.rev or "working tree"
    print(f"| mutant | bug | tests ({rev}) | outcome | first failing test |")
    print("|---|---|---|---|---|")
    for m, outcome, detail, _ in rows:
        print(f"| {m.name} | {m.what} | {', '.join(t.replace('tests/', '') for t in m.tests)} | {outcome} | {detail} |")
    caught = sum(outcome == "caught" for _, outcome, _, _ in rows)
    print(f"\n{caught} of {len(rows)} caught.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
