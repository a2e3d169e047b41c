"""A small parameter system for scores and metrics (scikit-learn style hyper-parameters).

Parameters are the annotated, public class attributes of a :class:`ParamClass` subclass
(in declaration order across the MRO, base classes first). An annotation without a value
declares a *required* parameter, shown as ``?`` until set. Instances are built from keyword
arguments only; :meth:`ParamClass._on_param_will_be_set` runs before every assignment, so a
subclass can e.g. invalidate fitted state when a hyper-parameter changes.
"""

from __future__ import annotations

import inspect
from abc import ABCMeta
from typing import Any, ClassVar, Final

__all__ = ["MISSING", "ParamClass"]


class _Missing:
    """Sentinel for a parameter without value (displayed as ``?``)."""

    _instance: ClassVar[_Missing | None] = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "?"

    def __reduce__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()


def _is_param_annotation(name: str, annotation: object) -> bool:
    if name.startswith("_"):
        return False
    text = annotation if isinstance(annotation, str) else repr(annotation)
    return "ClassVar" not in text


class _ParamMeta(ABCMeta):
    """Collects parameter names, in MRO declaration order, at class creation."""

    def __new__(
        mcs, name: str, bases: tuple[type, ...], namespace: dict[str, Any], **kwargs: Any
    ) -> _ParamMeta:
        cls = super().__new__(mcs, name, bases, namespace, **kwargs)
        names: list[str] = []
        for klass in reversed(cls.__mro__):
            annotations = inspect.get_annotations(klass)
            for attr, annotation in annotations.items():
                if _is_param_annotation(attr, annotation) and attr not in names:
                    names.append(attr)
        cls._param_names = tuple(names)  # type: ignore[attr-defined]
        return cls


class ParamClass(metaclass=_ParamMeta):
    """Base class of objects whose behaviour is set by named hyper-parameters."""

    _param_names: ClassVar[tuple[str, ...]] = ()
    #: Parameters added by scio on top of the reference API: ``repr`` shows them only when
    #: they differ from their default, so reprs of reference configurations are unchanged.
    _extension_params: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, **params: Any) -> None:
        unknown = [name for name in params if name not in self._param_names]
        if unknown:
            msg = (
                f"{type(self).__name__} got unexpected parameter(s) {unknown}; "
                f"valid parameters are {list(self._param_names)}"
            )
            raise TypeError(msg)
        for name, value in params.items():
            setattr(self, name, value)

    # -- parameters -------------------------------------------------------------------------
    @classmethod
    def _default(cls, name: str) -> Any:
        for klass in cls.__mro__:
            if name in klass.__dict__:
                return klass.__dict__[name]
        return MISSING

    @property
    def params(self) -> dict[str, Any]:
        """All parameters and their current values (``MISSING`` when unset)."""
        return {name: self.__dict__.get(name, self._default(name)) for name in self._param_names}

    @property
    def missing_params(self) -> tuple[str, ...]:
        """Names of the required parameters that have no value yet."""
        return tuple(name for name, value in self.params.items() if value is MISSING)

    def set_params(self, **params: Any) -> None:
        """Set several parameters; unknown names raise ``AttributeError``."""
        for name in params:
            if name not in self._param_names:
                msg = f"{name!r} is not a parameter of {type(self).__name__}"
                raise AttributeError(msg)
        for name, value in params.items():
            setattr(self, name, value)

    def _on_param_will_be_set(self, attr: str, future_val: Any) -> None:
        """Hook called before a parameter is assigned (override in subclasses)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._param_names:
            self._on_param_will_be_set(name, value)
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        if name in self._param_names:
            self._on_param_will_be_set(name, self._default(name))
            self.__dict__.pop(name, None)
            return
        super().__delattr__(name)

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: a required parameter that is still unset,
        # or a property that raised AttributeError (re-raise its own message).
        prop = getattr(type(self), name, None)
        if isinstance(prop, property) and prop.fget is not None:
            return prop.fget(self)
        if name in type(self)._param_names:
            msg = f"Parameter {name!r} of {type(self).__name__} has no value yet"
            raise AttributeError(msg)
        msg = f"{type(self).__name__!r} object has no attribute {name!r}"
        raise AttributeError(msg)

    # -- display ----------------------------------------------------------------------------
    def _params_repr(self, only_non_default: bool) -> str:
        items = []
        for name, value in self.params.items():
            if (only_non_default or name in self._extension_params) and value is not MISSING:
                default = self._default(name)
                try:
                    same = bool(value == default) and type(value) is type(default)
                except Exception:  # e.g. tensors: ambiguous truth value
                    same = value is default
                if same:
                    continue
            items.append(f"{name}={value!r}")
        return ", ".join(items)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._params_repr(only_non_default=False)})"

    def __str__(self) -> str:
        return f"{type(self).__name__}({self._params_repr(only_non_default=True)})"
