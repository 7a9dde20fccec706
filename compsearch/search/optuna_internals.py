"""The few private parts of Optuna compsearch relies on, in one place.

Optuna's public API has no way to reach a study's storage or a trial's storage id, which the driver
needs to keep heartbeats for trials it runs outside `Study.optimize`, to fail and re-queue a trial it
no longer holds, and to put enqueued trials into NSGA-II's generation; nor a public hypervolume. When
Optuna changes, this file is the one to change.
"""
from __future__ import annotations

import numpy as np
import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial


def storage_of(study: optuna.Study) -> BaseStorage:
    return study._storage


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The trial's id in its storage (not its number in the study)."""
    return trial._trial_id


def hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    """The hypervolume of minimized `points` (n x objectives) dominated up to `reference`."""
    from optuna._hypervolume import compute_hypervolume

    return float(compute_hypervolume(points, reference))
