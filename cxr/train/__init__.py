"""The training run: the run itself, the step and its loss, validation, checkpoints, the output folder, TensorBoard."""
