"""The model's configuration: every VQModel constructor argument, read back as ``model.config.x``."""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable


class FrozenConfig(dict):
    """A read-only dict whose keys are also attributes (diffusers' FrozenDict behaviour)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no attribute {name!r}") from None

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("the model config is read-only; build a new model to change it")

    __setattr__ = __setitem__ = __delitem__ = _refuse
    update = pop = popitem = setdefault = clear = _refuse

    def __reduce__(self):
        # copy, deepcopy and pickle rebuild through the constructor, not by item assignment.
        return (type(self), (dict(self),))


def init_args_from_config(init: Callable, config: dict[str, Any], cls_name: str) -> dict[str, Any]:
    """The constructor arguments in ``config``.

    diffusers' bookkeeping keys (those starting with "_") are dropped; keys the constructor does
    not know are dropped with a warning, as diffusers does, so configs written by newer versions load.
    """
    params = set(inspect.signature(init).parameters) - {"self"}
    unknown = sorted(k for k in config if not k.startswith("_") and k not in params)
    if unknown:
        warnings.warn(f"{cls_name} ignores config keys it does not know: {unknown}", stacklevel=3)
    return {k: v for k, v in config.items() if k in params}
