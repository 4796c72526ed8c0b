"""Applications of trained models: evaluate, recognize + preprocess, serve, export, finetune, and training
with its full end-of-run report."""
