"""A small parameter system for scores and metrics (scikit-learn style hyper-parameters).

Parameters are the annotated, public class attributes of a :class:`ParamClass` subclass
(in declaration order across the MRO, base classes first). An annotation without a value
declares a *required* parameter, shown as ``?`` until set. Parameters are given as keyword
arguments; as with the reference's paramclasses, a class defining ``__post_init__`` also takes
``post_init_args`` (an iterable, when ``__post_init__`` accepts positional arguments) and/or
``post_init_kwargs`` (a mapping, when it accepts keyword arguments) positionally, and
``__post_init__(*post_init_args, **post_init_kwargs)`` runs once the parameters are set.
:meth:`ParamClass._on_param_will_be_set` runs before every assignment, so a subclass can e.g.
invalidate fitted state when a hyper-parameter changes.

Every assigned value is checked against the parameter's annotation (builtin types, unions,
``Literal`` and enums; other annotations are not checked), so ``KNN(k="5")`` or
``Softmax(mode="bogus")`` fail at construction or :meth:`~ParamClass.set_params`, not later.
"""

from __future__ import annotations

import collections.abc
import enum
import inspect
import numbers
import sys
import types
import typing
from abc import ABCMeta
from typing import Any, ClassVar, Final

import numpy as np

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


_UNCHECKED = object()  # an annotation that is not checked


def _resolve(klass: type, annotation: object) -> object:
    """The annotation object (strings evaluated in the defining module), or ``_UNCHECKED``."""
    if not isinstance(annotation, str):
        return annotation
    module = sys.modules.get(klass.__module__)
    namespace = dict(vars(module)) if module is not None else {}
    namespace.setdefault("typing", typing)
    try:
        return eval(annotation, namespace, dict(vars(klass)))  # the classes' own annotations
    except Exception:  # names only imported for type checking: not checked
        return _UNCHECKED


def _accepts(annotation: object, value: Any) -> bool | None:
    """Whether ``value`` fits ``annotation`` (``None``: annotation not checked)."""
    if annotation is _UNCHECKED or annotation is Any or annotation is typing.Any:
        return None
    alias_type = getattr(typing, "TypeAliasType", None)  # ``type X = ...`` (Python >= 3.12)
    if alias_type is not None and isinstance(annotation, alias_type):
        return _accepts(annotation.__value__, value)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        verdicts = [_accepts(arg, value) for arg in typing.get_args(annotation)]
        if any(v is None for v in verdicts):
            return None
        return any(verdicts)
    if origin is typing.Literal:
        return any(value == arg and type(value) is not bool for arg in typing.get_args(annotation))
    if annotation is None or annotation is type(None):
        return value is None
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        try:
            annotation(value)
        except ValueError:
            return False
        return True
    if annotation is bool:
        return isinstance(value, bool | np.bool_)
    if annotation is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin is collections.abc.Callable or annotation is collections.abc.Callable:
        return callable(value)
    target = origin if origin is not None else annotation
    if isinstance(target, type):
        if typing.is_typeddict(target) or target is dict:
            return isinstance(value, collections.abc.Mapping)
        try:
            return isinstance(value, target)
        except TypeError:
            return None
    return None


def _describe(annotation: object) -> str:
    if isinstance(annotation, type):
        return annotation.__qualname__
    return str(annotation).replace("typing.", "")


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
        cls._param_annotations = None  # type: ignore[attr-defined]  # resolved on first use
        return cls


class ParamClass(metaclass=_ParamMeta):
    """Base class of objects whose behaviour is set by named hyper-parameters."""

    _param_names: ClassVar[tuple[str, ...]] = ()
    #: Parameters added by scio on top of the reference API: ``repr`` shows them only when
    #: they differ from their default, so reprs of reference configurations are unchanged.
    _extension_params: ClassVar[frozenset[str]] = frozenset()
    #: Check assigned values against the annotations (off for classes that validate their
    #: parameters themselves with the reference's own exception types).
    _check_annotations: ClassVar[bool] = True

    def __init__(self, *post_init: Any, **params: Any) -> None:
        unknown = [name for name in params if name not in self._param_names]
        if unknown:
            msg = (
                f"{type(self).__name__} got unexpected parameter(s) {unknown}; "
                f"valid parameters are {list(self._param_names)}"
            )
            raise TypeError(msg)
        args, kwargs = self._post_init_arguments(post_init)
        for name, value in params.items():
            setattr(self, name, value)
        post_init_method = getattr(self, "__post_init__", None)
        if post_init_method is not None:
            post_init_method(*args, **kwargs)

    @classmethod
    def _post_init_arguments(cls, given: tuple[Any, ...]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Split ``(post_init_args, post_init_kwargs)`` as paramclasses' signature does."""
        method = getattr(cls, "__post_init__", None)
        slots: list[str] = []
        if method is not None:
            signature = inspect.signature(method)
            kinds = [p.kind for p in list(signature.parameters.values())[1:]]
            P = inspect.Parameter
            if any(
                k in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD, P.VAR_POSITIONAL) for k in kinds
            ):
                slots.append("post_init_args")
            if any(k in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY, P.VAR_KEYWORD) for k in kinds):
                slots.append("post_init_kwargs")
        if len(given) > len(slots):
            accepted = f"only {' and '.join(f'`{s}`' for s in slots)}" if slots else "none"
            msg = (
                f"{cls.__name__}() takes parameters as keyword arguments; positional arguments "
                f"are passed to __post_init__ ({accepted} accepted), got {len(given)}: {given!r}"
            )
            raise TypeError(msg)
        args: tuple[Any, ...] = ()
        kwargs: dict[str, Any] = {}
        for slot, value in zip(slots, given):
            if slot == "post_init_args":
                if isinstance(value, collections.abc.Mapping | str) or not isinstance(
                    value, collections.abc.Iterable
                ):
                    msg = (
                        f"`post_init_args` of {cls.__name__} must be a non-mapping iterable of "
                        f"positional arguments for __post_init__ (got {value!r})"
                    )
                    raise TypeError(msg)
                args = tuple(value)
            else:
                if not isinstance(value, collections.abc.Mapping):
                    msg = (
                        f"`post_init_kwargs` of {cls.__name__} must be a mapping of keyword "
                        f"arguments for __post_init__ (got {value!r})"
                    )
                    raise TypeError(msg)
                kwargs = dict(value)
        return args, kwargs

    @classmethod
    def _annotation_of(cls, name: str) -> object:
        annotations = cls.__dict__.get("_param_annotations")
        if annotations is None:
            annotations = {}
            for klass in reversed(cls.__mro__):
                for attr, annotation in inspect.get_annotations(klass).items():
                    if attr in cls._param_names:
                        annotations[attr] = _resolve(klass, annotation)
            cls._param_annotations = annotations  # type: ignore[attr-defined]
        return annotations.get(name, _UNCHECKED)

    def _check_param_value(self, name: str, value: Any) -> None:
        """Raise if ``value`` does not fit the annotation of parameter ``name``."""
        if value is MISSING or not self._check_annotations:
            return
        annotation = type(self)._annotation_of(name)
        if _accepts(annotation, value) is not False:
            return
        enums = [
            arg
            for arg in (typing.get_args(annotation) or (annotation,))
            if isinstance(arg, type) and issubclass(arg, enum.Enum)
        ]
        if enums and isinstance(value, str):
            try:
                enums[0](value)
            except ValueError as exc:
                msg = f"Invalid value for parameter `{name}` of {type(self).__name__}: {exc}"
                raise ValueError(msg) from None
        msg = (
            f"Parameter `{name}` of {type(self).__name__} must be {_describe(annotation)} "
            f"(got {value!r} of type {type(value).__name__})"
        )
        raise TypeError(msg)

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
        """Set several parameters; unknown names raise ``AttributeError``, values that do not
        fit the annotation ``TypeError`` (or ``ValueError`` for an enum value), before any is
        set."""
        for name in params:
            if name not in self._param_names:
                msg = f"{name!r} is not a parameter of {type(self).__name__}"
                raise AttributeError(msg)
        for name, value in params.items():
            self._check_param_value(name, value)
        for name, value in params.items():
            setattr(self, name, value)

    def _on_param_will_be_set(self, attr: str, future_val: Any) -> None:
        """Hook called before a parameter is assigned (override in subclasses)."""

    @property
    def _param_version(self) -> int:
        """Number of parameter assignments and deletions so far (cheap change detection)."""
        return int(self.__dict__.get("_n_param_sets", 0))

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._param_names:
            self._check_param_value(name, value)
            self._on_param_will_be_set(name, value)
            self.__dict__["_n_param_sets"] = self.__dict__.get("_n_param_sets", 0) + 1
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        if name in self._param_names:
            self._on_param_will_be_set(name, self._default(name))
            self.__dict__.pop(name, None)
            self.__dict__["_n_param_sets"] = self.__dict__.get("_n_param_sets", 0) + 1
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
