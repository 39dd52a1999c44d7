"""Find reward functions by registry name, import path or file path.

A reward function is called as TRL calls one, with keywords only: ``fn(prompts=...,
completions=..., completion_ids=..., **columns) -> list[float | None]`` (async functions are
accepted; a factory is called first with ``RewardSpec.factory``). Specs:

- a registry name: ``math``, ``code``, ``instructions``, ``reward_model`` or anything added
  with ``@register_reward("name")``;
- an import path: ``package.module:function``;
- a file path: ``path/to/file.py:function`` (relative paths are resolved from the current
  directory, or from ``base_dir`` when given).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import sys
import threading
from pathlib import Path
from typing import Callable

__all__ = ["check_reward_kwargs", "is_builtin_reward", "load_reward", "register_reward", "registered_rewards", "RewardLoadError"]

RewardFn = Callable[..., object]

_REGISTRY: dict[str, RewardFn] = {}
# built-in rewards are imported lazily: their modules pull in heavy dependencies
_BUILTIN = {
    "math": "rewards.math:math_reward",
    "code": "rewards.code:code_reward",
    "instructions": "rewards.instructions:instructions_reward",
    "reward_model": "rewards.reward_model:reward_model_reward",
}
# Built-in rewards whose options are known: a checker of the recipe's kwargs, run when the recipe
# loads (the functions themselves take **columns at call time, so a misspelt option would pass).
_BUILTIN_KWARGS_CHECKS = {
    "reward_model": "rewards.reward_model:check_recipe_kwargs",
}
# Re-entrant: executing a reward file (load_reward) runs its `@register_reward` decorators, which
# take this lock again on the same thread; a plain Lock deadlocked there.
_lock = threading.RLock()


class RewardLoadError(ValueError):
    """A reward spec could not be resolved to a callable."""


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make ``fn`` loadable as ``load_reward(name)``."""

    def deco(fn: RewardFn) -> RewardFn:
        if not callable(fn):
            raise TypeError(f"register_reward({name!r}) needs a callable, got {type(fn).__name__}")
        with _lock:
            _REGISTRY[name] = fn
        return fn

    return deco


def is_builtin_reward(name: str) -> bool:
    """A name of a reward shipped with the project (and not replaced by a registered one)."""
    return name in _BUILTIN and name not in _REGISTRY


def registered_rewards() -> list[str]:
    return sorted(set(_REGISTRY) | set(_BUILTIN))


_EXPECTED = ("a registered reward name ({names}), an import path 'package.module:function', "
             "or a file path 'path/to/file.py:function'")


def _fail(spec: str, why: str) -> RewardLoadError:
    return RewardLoadError(f"cannot load reward {spec!r}: {why}. Expected "
                           + _EXPECTED.format(names=", ".join(registered_rewards())))


def _from_module(spec: str, module, attr: str, shown_as: str | None = None) -> RewardFn:
    """`attr` of `module`; `shown_as` names the module in errors (a file's path, not the internal
    name it is imported under)."""
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            functions = [k for k, v in vars(obj).items() if callable(v) and not k.startswith("_")]
            close = difflib.get_close_matches(part, functions, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else (
                f"; it defines: {', '.join(sorted(functions))}" if functions else "")
            where = shown_as or str(getattr(module, "__name__", module))
            raise _fail(spec, f"{where} has no attribute {attr!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise _fail(spec, f"{attr!r} is a {type(obj).__name__}, not a function")
    return obj


def check_reward_kwargs(spec: str, kwargs: dict) -> None:
    """Raise ValueError for kwargs a built-in reward does not take or cannot use; other rewards
    (user functions, TRL's) are not checked here."""
    if isinstance(spec, str) and spec.strip() in _BUILTIN_KWARGS_CHECKS and spec.strip() not in _REGISTRY:
        mod, _, attr = _BUILTIN_KWARGS_CHECKS[spec.strip()].partition(":")
        getattr(importlib.import_module(mod), attr)(kwargs)


def load_reward(spec: str, base_dir: str | Path | None = None) -> RewardFn:
    """Resolve ``spec`` to a reward function (see the module docstring)."""
    if callable(spec):
        return spec  # already a function
    if not isinstance(spec, str) or not spec.strip():
        raise _fail(str(spec), "empty or not a string")
    spec = spec.strip()
    if spec in _REGISTRY:
        return _REGISTRY[spec]
    if spec in _BUILTIN:
        mod, _, attr = _BUILTIN[spec].partition(":")
        return _from_module(spec, importlib.import_module(mod), attr)
    if ":" not in spec:
        raise _fail(spec, "not a registered name, and no ':function' part")
    target, _, attr = spec.rpartition(":")
    if not attr:
        raise _fail(spec, "nothing after ':'")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        path = path.resolve()
        if not path.is_file():
            raise _fail(spec, f"file {str(path)!r} does not exist")
        name = "reward_file_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
        with _lock:
            module = sys.modules.get(name)
            if module is None:
                s = importlib.util.spec_from_file_location(name, path)
                if s is None or s.loader is None:
                    raise _fail(spec, f"cannot import {str(path)!r}")
                module = importlib.util.module_from_spec(s)
                sys.modules[name] = module
                try:
                    s.loader.exec_module(module)
                except Exception as e:
                    sys.modules.pop(name, None)
                    raise _fail(spec, f"importing {str(path)!r} raised {type(e).__name__}: {e}") from e
        return _from_module(spec, module, attr, shown_as=str(path))
    try:
        module = importlib.import_module(target)
    except ImportError as e:
        raise _fail(spec, f"module {target!r} cannot be imported ({e})") from e
    return _from_module(spec, module, attr)
