"""Training a recipe with everything a run delivers: the loop of hwrjax.training plus, at its end,
the temperature that calibrates the reported model (fitted on validation, stored in
WORKDIR/calibration.json and named in test_metrics.json) and the report's pictures."""

from __future__ import annotations

import ml_collections

from hwrjax.apps import evaluate as evaluate_lib
from hwrjax.inference import loader, predict
from hwrjax.inference import calibration as calibration_lib
from hwrjax.training import loop


class TrainingReport(loop.RunReport):
    """The end of a run as `hwrjax.train_and_evaluate` and launch.py write it: the fitted temperature,
    then (with config.report_plots) the training curves, test confusion matrix and mistakes."""

    def __init__(self):
        self._model: loader.LoadedModel | None = None

    def metrics(self, run: loop.FinishedRun) -> dict:
        self._model = loader.as_loaded_model(run.state, run.config.loss.name)
        if not run.splits.validation:
            return {}
        # Stored with the run for every command that loads this checkpoint (hwrjax.inference.calibration).
        record = predict.fit_calibration(self._model, run.splits.validation.images, run.splits.validation.labels,
                                         batch_size=run.config.eval_batch_size)
        calibration_lib.save_calibration(run.workdir, run.checkpoint_step, record)
        self._model = loader.with_temperature(self._model, record["temperature"], record)
        return {"temperature": record["temperature"]}

    def files(self, run: loop.FinishedRun) -> None:
        if not run.config.report_plots:
            return
        test = run.splits.test
        probs = predict.predict_probs(self._model, test.images, batch_size=run.config.eval_batch_size)
        evaluate_lib.write_training_report(run.workdir, None, evaluate_lib.SplitPredictions(
            test.images, test.labels, probs, run.splits.class_names, "test"), step=run.step)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool = False) -> dict:
    """Trains the recipe in `config` in `workdir` (resuming a run there) and writes its full report;
    returns the test metrics. See `hwrjax.training.loop.train_and_evaluate`."""
    return loop.train_and_evaluate(config, workdir, allow_config_change, report=TrainingReport())
