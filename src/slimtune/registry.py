"""One registry per recipe axis. A method registers itself where it is defined.

Adding a method never edits this file: ``@register("params", "mymethod")`` on a class in any module
under ``slimtune.methods`` is enough, because :func:`load_all` imports every such module.

A recipe section (``params: {name: lora, r: 8}``) becomes an instance of the method's ``Config``
dataclass that carries the method's name as a real field, so ``dataclasses.replace(cfg.params,
r=4)`` stays a LoRA spec, and :func:`build` turns any such spec into its method.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import pkgutil
from typing import Any

from .errors import SlimtuneError

AXES = ("base", "params", "optimizer", "objective")
# Axes that are no recipe method section (no ``Config`` of their own; a plain recipe field names
# one): ``federated.strategy`` picks a class of ``slimtune.federated.strategies``.
OTHER_AXES = ("strategy",)
_REGISTRY: dict[str, dict[str, type]] = {axis: {} for axis in AXES + OTHER_AXES}
_loaded = False

NAME_DOC = "The registered method name (the recipe's `name:`); set by the registry."


def _named(config: type, name: str) -> type:
    """``config`` with a ``name`` field fixed to ``name``: not an ``__init__`` argument (so not a
    recipe option, and ``replace`` keeps it), but in ``fields``, ``asdict``, ``repr`` and ``==``.

    A subclass under the same qualified name, so the registered ``Config`` is what a method's
    module exposes (and pickles, and what a subclass's ``Config`` derives from)."""
    params = config.__dataclass_params__  # type: ignore[attr-defined]
    named = dataclasses.make_dataclass(
        config.__name__,
        [("name", str, dataclasses.field(default=name, init=False, metadata={"doc": NAME_DOC}))],
        bases=(config,),
        frozen=params.frozen,
        eq=params.eq,
    )
    named.__module__, named.__qualname__ = config.__module__, config.__qualname__
    named.__doc__ = config.__doc__
    return named


def register(axis: str, name: str):
    """Class decorator: make ``cls`` selectable as ``<axis>: <name>`` in a recipe. Its ``Config``
    (a dataclass) gains the ``name`` field (see :func:`_named`)."""

    def deco(cls: type) -> type:
        if name in _REGISTRY[axis]:
            raise ValueError(f"{axis} method {name!r} registered twice")
        cls.name = name
        if axis in AXES:
            cls.Config = _named(cls.Config, name)
        _REGISTRY[axis][name] = cls
        return cls

    return deco


def load_all() -> None:
    """Import every module below ``slimtune.methods`` and ``slimtune.federated.strategies`` so
    that each registers itself."""
    global _loaded
    if _loaded:
        return
    from . import methods
    from .federated import strategies

    for package in (methods, strategies):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
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


def build(axis: str, spec: Any) -> Any:
    """The method a spec (a registered ``Config`` instance, e.g. ``cfg.params``) names, bound to
    that spec: ``build("params", cfg.params)`` is the recipe's params method."""
    return get(axis, spec.name)(spec)


def options(config: type) -> list[dataclasses.Field]:
    """A method ``Config``'s recipe options: its fields but the registry's ``name``."""
    return [f for f in dataclasses.fields(config) if f.init]
