"""What a compression changed in a model, so a shared model (a worker's base model) can be put back
exactly, whatever the technique touched."""
from __future__ import annotations

import copy

from torch import nn


class ModelEdits:
    """The names of the modules changed in place or replaced, in the order they were first changed;
    with `undoable`, a copy of each taken before its change, so `undo_` restores the model."""

    def __init__(self, undoable: bool = False):
        self.undoable = undoable
        self.changed: list[str] = []
        self._originals: list[tuple[str, nn.Module]] = []

    def before_change(self, model: nn.Module, name: str) -> None:
        """Call before module `name` of `model` is changed or replaced."""
        if name in self.changed or any(name.startswith(f"{outer}.") for outer in self.changed):
            return  # saved already, or inside a module saved whole before any of its parts changed
        self.changed.append(name)
        if self.undoable:
            self._originals.append((name, copy.deepcopy(model.get_submodule(name))))

    def undo_(self, model: nn.Module) -> None:
        """Put every changed module back as it was (latest change first)."""
        if not self.undoable:
            raise ValueError("these edits were recorded without copies (undoable=False): they cannot be undone")
        for name, original in reversed(self._originals):
            model.set_submodule(name, original)
        self.changed, self._originals = [], []
