"""Using a trained run: the one model loader, predictions, test-time augmentation, ensembles,
calibrated probabilities and the metrics of a report."""
