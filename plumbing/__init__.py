"""The plumbing: what the method files (model.py, data.py, train.py, ...) need but do not teach.

Files on disk (checkpoints, datafiles), torchrun's process group (distributed), torch.compile (compiled),
the user's mistakes (errors), the commands' flags (train_cli, evaluate_cli), the built-in dataset
(builtin), MTEB (mteb_model), paired significance tests (significance). Read when you need them.
"""
