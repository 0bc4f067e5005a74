"""The model's configuration: every VQModel constructor argument, read back as ``model.config.x``."""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any, Callable

from .messages import short_repr


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


def init_args_from_config(
    init: Callable, config: dict[str, Any], cls_name: str, source: str | None = None
) -> dict[str, Any]:
    """The constructor arguments in ``config``, validated (see ``validate_config``).

    diffusers' bookkeeping keys (those starting with "_") are dropped; keys the constructor does
    not know are dropped with a warning, as diffusers does, so configs written by newer versions load.
    ``source`` (the config file, when there is one) is named in errors.
    """
    params = set(inspect.signature(init).parameters) - {"self"}
    unknown = sorted(k for k in config if not k.startswith("_") and k not in params)
    if unknown:
        warnings.warn(f"{cls_name} ignores config keys it does not know: {unknown}", stacklevel=3)
    args = {k: v for k, v in config.items() if k in params}
    validate_config(args, source, defaults={
        k: p.default for k, p in inspect.signature(init).parameters.items() if p.default is not inspect.Parameter.empty
    })
    return args


# -------------------------------------------------------------------- validation

#: Keys holding a count that must be a positive integer.
_POSITIVE_INTS = ("in_channels", "out_channels", "latent_channels", "layers_per_block", "num_vq_embeddings",
                  "norm_num_groups")
_BOOLS = ("mid_block_add_attention", "lookup_from_codebook", "force_upcast")
#: SpatialNorm's GroupNorm has 32 groups whatever the config says (as in diffusers).
SPATIAL_NORM_GROUPS = 32


def validate_config(config: dict[str, Any], source: str | None = None, defaults: dict[str, Any] | None = None) -> None:
    """ValueError naming ``source`` (the config file, or "config"), the key, the value and what
    was expected, for the first problem in ``config``: a wrong type (a count given as "4", a bool
    as 1), a count below 1, an empty or mis-sized ``block_out_channels``, unknown block types,
    activation or norm type, or channels that ``norm_num_groups`` (32 for a SpatialNorm decoder)
    does not divide. Keys absent from ``config`` take ``defaults`` (the constructor's)."""
    from .blocks import DOWN_BLOCK_TYPES, UP_BLOCK_TYPES
    from .layers import ACTIVATIONS

    where = f"config file {source}" if source else "config"
    c = {**(defaults or {}), **config}

    def bad(key: str, expected: str) -> ValueError:
        return ValueError(f"{where}: {key!r} is {short_repr(c[key])}; expected {expected}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for key in _POSITIVE_INTS:
        if key in c and not (is_int(c[key]) and c[key] >= 1):
            raise bad(key, "a positive integer")
    size = c.get("sample_size", 1)
    if not (is_int(size) and size >= 1) and not (isinstance(size, (list, tuple)) and len(size) == 2
                                                  and all(is_int(x) and x >= 1 for x in size)):
        raise bad("sample_size", "a positive integer (or a list of two)")
    if c.get("vq_embed_dim") is not None and not (is_int(c["vq_embed_dim"]) and c["vq_embed_dim"] >= 1):
        raise bad("vq_embed_dim", "a positive integer or null (null: latent_channels)")
    for key in _BOOLS:
        if key in c and not isinstance(c[key], bool):
            raise bad(key, "true or false")
    if "scaling_factor" in c and not (isinstance(c["scaling_factor"], (int, float))
                                      and not isinstance(c["scaling_factor"], bool)
                                      and math.isfinite(c["scaling_factor"])):
        raise bad("scaling_factor", "a finite number")
    if "act_fn" in c and not (isinstance(c["act_fn"], str) and c["act_fn"].lower() in ACTIVATIONS):
        raise bad("act_fn", f"one of {sorted(ACTIVATIONS)}")
    if "norm_type" in c and c["norm_type"] not in ("group", "spatial"):
        raise bad("norm_type", "'group' or 'spatial'")

    channels = c.get("block_out_channels")
    if channels is None:
        return
    if not (isinstance(channels, (list, tuple)) and channels and all(is_int(x) and x >= 1 for x in channels)):
        raise bad("block_out_channels", "a non-empty list of positive integers")
    for key, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
        if key not in c:
            continue
        types = c[key]
        if not (isinstance(types, (list, tuple)) and all(isinstance(t, str) for t in types)):
            raise bad(key, f"a list of block type names from {list(allowed)}")
        unknown = [t for t in types if t not in allowed]
        if unknown:
            raise bad(key, f"block types from {list(allowed)} (unknown: {unknown})")
        if len(types) != len(channels):
            raise bad(key, f"one entry per block_out_channels ({len(channels)} entries)")
    groups = c.get("norm_num_groups")
    if is_int(groups):
        uneven = [x for x in channels if x % groups]
        if uneven:
            raise bad("block_out_channels", f"channels divisible by norm_num_groups={groups} "
                                            f"(not divisible: {uneven})")
    if c.get("norm_type") == "spatial":
        uneven = [x for x in channels if x % SPATIAL_NORM_GROUPS]
        if uneven:
            raise bad("block_out_channels", f"channels divisible by {SPATIAL_NORM_GROUPS} with norm_type='spatial' "
                                            f"(SpatialNorm's GroupNorm has {SPATIAL_NORM_GROUPS} groups; "
                                            f"not divisible: {uneven})")
        vq_dim = c.get("vq_embed_dim")
        if vq_dim is not None and vq_dim != c.get("latent_channels"):
            raise bad("vq_embed_dim", f"null or equal to latent_channels ({c.get('latent_channels')}) with "
                                      "norm_type='spatial' (the decoder is conditioned on the quantized latents)")
