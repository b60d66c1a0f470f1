"""Hyperparameter sweeps: trials are ordinary jobs, chosen by Optuna's samplers and stopped
by its pruners, with every piece of state in our own tables.

- ``space.py``: the search space a client sends, checked against the spec before anything runs.
- ``study.py``: an in-memory Optuna study rebuilt from the tables, to ask for the next
  parameters or ask the pruner about a running trial.
- ``controller.py``: starts trials up to the sweep's parallelism and ends the sweep; it runs
  in the dispatcher, under its lock, so one process at a time writes.
- ``sweeps.py``: the service functions behind the routes (create, view, cancel, promote).
- ``plot.py``: the sweep's picture.
"""
