"""What a compression changed in a model, so a shared model (a worker's base model) can be put back
exactly, whatever the technique touched."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

_STATE = ("_parameters", "_buffers", "_modules", "_forward_pre_hooks")  # copied, not shared, when saved


@dataclass
class _Saved:
    """A module as it was: the object itself, its attributes (which submodules, parameters and buffers it
    held, and plain values such as a head grouping) and the values of every tensor below it."""

    module: nn.Module
    attributes: dict
    values: list[tuple[torch.Tensor, torch.Tensor]]


class ModelEdits:
    """The names of the modules changed in place or replaced, in the order they were first changed;
    with `undoable`, what each was before its change, so `undo_` restores the model.

    Undoing puts back the very objects and tensors the model had, so weights that two modules share
    (a token embedding tied to the output head) stay shared and are restored for both.
    """

    def __init__(self, undoable: bool = False):
        self.undoable = undoable
        self.changed: list[str] = []
        self._saved: list[tuple[str, _Saved]] = []

    def before_change(self, model: nn.Module, name: str) -> None:
        """Call before module `name` of `model` is changed or replaced."""
        if name in self.changed or any(name.startswith(f"{outer}.") for outer in self.changed):
            return  # saved already, or inside a module saved whole before any of its parts changed
        self.changed.append(name)
        if self.undoable:
            module = model.get_submodule(name)
            attributes = {key: (copy.copy(value) if key in _STATE else value) for key, value in vars(module).items()}
            tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}.values()
            self._saved.append((name, _Saved(module, attributes, [(t, t.detach().clone()) for t in tensors])))

    def undo_(self, model: nn.Module) -> None:
        """Put every changed module back as it was (latest change first)."""
        if not self.undoable:
            raise ValueError("these edits were recorded without copies (undoable=False): they cannot be undone")
        for name, saved in reversed(self._saved):
            vars(saved.module).clear()
            vars(saved.module).update(saved.attributes)
            with torch.no_grad():
                for tensor, value in saved.values:
                    if tensor.shape == value.shape:
                        tensor.copy_(value)
                    else:
                        tensor.data = value
            if model.get_submodule(name) is not saved.module:
                model.set_submodule(name, saved.module)
        self.changed, self._saved = [], []
