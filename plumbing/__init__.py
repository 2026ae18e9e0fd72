"""The plumbing: what the method files (model.py, data.py, train.py, ...) need but do not teach.
Read when you need them.

Below the method (importing no method file): files on disk (base_checkpoints, model_folders,
released, run_folder, atomic_folders, datafiles, training_files), torchrun's process group
(distributed), torch.compile (compiled), the user's mistakes (errors), signals (interrupts), the
run's guards (guards), the batch order (sampler), evaluation's input checks (eval_checks),
tensorboard (tracking), paired significance tests (significance), data.py's checking command
(data_cli).
Above it (importing the method): loading, the built-in dataset (builtin), MFU (mfu), MTEB
(mteb_model), the commands' flags (train_cli, evaluate_cli).
"""
