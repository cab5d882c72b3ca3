"""``GuardedAdamW.state``: torch's ``defaultdict`` of per-param dicts, counting structural edits.

The step plan (step_plan.py) keeps every param's state tensors in lists, so that a call does
not look up thousands of dicts. That is right only while the dicts still hold those tensors.
Code that puts new ones in (``ZeroRedundancyOptimizer.load_state_dict`` assigns
``optim.state[p] = {...}`` and then ``optim.state[p]["step"] = ...``; a user resetting a moment
with ``opt.state[p]["exp_avg"] = torch.zeros_like(p)``) must make the next call rebuild the
plan, or the kernels keep updating tensors nobody reads. Checking every dict on every call
costs ~0.1 us per param; instead these dicts count each edit (an entry set, removed or
replaced, at either level) in one counter, and the plan records the count it was built at.
In-place changes of a tensor (``copy_``, ``zero_``) are no edit and need none.

A plain dict put in (``opt.state[p] = {...}``, or a whole ``opt.state`` assigned) is adopted
when the next plan is built: copied into a :class:`ParamState`, which keeps the same tensors.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable


class EditCount:
    """The counter an optimizer's state dicts share."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


# The methods of dict that change which objects it holds; each counts one edit.
_EDITS = ("__setitem__", "__delitem__", "__ior__", "pop", "popitem", "clear", "update", "setdefault")


def _counting(cls):
    for name in _EDITS:
        edit = getattr(dict, name)

        def method(self, *args, _edit=edit, **kwargs):
            self._edits.value += 1
            return _edit(self, *args, **kwargs)

        method.__name__ = method.__qualname__ = name
        setattr(cls, name, method)
    return cls


@_counting
class ParamState(dict):
    """One param's state (``step``, ``exp_avg``, ``exp_avg_sq``): a dict that counts edits."""

    __slots__ = ("_edits",)

    def __init__(self, edits: EditCount | None = None, entries: Iterable = ()):
        self._edits = edits if edits is not None else EditCount()
        dict.update(self, entries)

    def __reduce__(self):  # pickles and deep-copies as its entries (the owner adopts a copy)
        return ParamState, (None, dict(self))


@_counting
class OptimizerState(defaultdict):
    """param -> :class:`ParamState`, created on first lookup as torch's ``defaultdict(dict)``."""

    __slots__ = ("_edits",)

    def __init__(self, entries: Iterable = ()):
        super().__init__(dict)
        self._edits = EditCount()
        for key, value in dict(entries).items():
            dict.__setitem__(self, key, self.adopt(value))

    @property
    def edits(self) -> int:
        return self._edits.value

    def __missing__(self, key):
        self[key] = value = ParamState(self._edits)
        return value

    def adopt(self, value: Any) -> Any:
        """``value`` as an entry that counts into this state's edits: itself when it does, else
        a dict is copied into a ParamState (same tensors; one counting into another state's
        edits too, as after a shallow copy both states may hold it), anything else kept."""
        if isinstance(value, ParamState) and value._edits is self._edits:
            return value
        if isinstance(value, dict):
            return ParamState(self._edits, value)
        return value

    def adopt_entry(self, key) -> Any:
        """The entry of ``key``, adopted (and put back when it had to be copied); not an edit."""
        value = dict.get(self, key)
        adopted = self.adopt(value) if value is not None else self[key]
        if adopted is not value:
            dict.__setitem__(self, key, adopted)
        return adopted

    def __reduce__(self):
        return OptimizerState, (dict(self),)

    def __copy__(self):  # defaultdict's would call OptimizerState(dict, self)
        return OptimizerState(self)  # (with copies of the entries: this state's stay its own)

    copy = __copy__
