"""One registry per recipe axis. A method registers itself where it is defined.

Adding a method never edits this file: ``@register("params", "mymethod")`` on a class in any module
under ``slimtune.methods`` is enough, because :func:`load_all` imports every such module.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import Any

from .errors import SlimtuneError

AXES = ("params", "optimizer")
_REGISTRY: dict[str, dict[str, type]] = {axis: {} for axis in AXES}
_loaded = False


def register(axis: str, name: str):
    """Class decorator: make ``cls`` selectable as ``<axis>: <name>`` in a recipe."""

    def deco(cls: type) -> type:
        if name in _REGISTRY[axis]:
            raise ValueError(f"{axis} method {name!r} registered twice")
        cls.name = name
        _REGISTRY[axis][name] = cls
        return cls

    return deco


def load_all() -> None:
    """Import every module below ``slimtune.methods`` so that each registers itself."""
    global _loaded
    if _loaded:
        return
    from . import methods

    for info in pkgutil.walk_packages(methods.__path__, methods.__name__ + "."):
        importlib.import_module(info.name)
    _loaded = True


def names(axis: str) -> list[str]:
    load_all()
    return sorted(_REGISTRY[axis])


def get(axis: str, name: str) -> Any:
    load_all()
    try:
        return _REGISTRY[axis][name]
    except KeyError:
        hint = difflib.get_close_matches(name, _REGISTRY[axis], n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise SlimtuneError(
            f"{axis}: unknown method {name!r}{extra}; choose one of: {', '.join(names(axis))}"
        ) from None
