"""Typed reads of model config values: a value that is not what the key needs is an error, not a guess.

The reference configs' trailing commas (``alignment_weight: 10,``) turned numbers and booleans into
strings that were then silently used; here they fail with the key, the value and the fix.
"""
from lavis_pformer.errors import ConfigError


def as_float(cfg, key, default=None, minimum=None):
    value = cfg.get(key, default)
    if value is None:
        raise ConfigError(f"model.{key} is required (a number)")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(
            f"model.{key} must be a number, got {value!r} ({type(value).__name__}); "
            "remove quotes or trailing commas in the yaml, e.g. `{key}: 10`".replace("{key}", key)
        )
    if minimum is not None and value < minimum:
        raise ConfigError(f"model.{key} must be >= {minimum}, got {value}")
    return float(value)


def as_int(cfg, key, default=None, minimum=None):
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"model.{key} must be an integer, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ConfigError(f"model.{key} must be >= {minimum}, got {value}")
    return value


def as_bool(cfg, key, default=None):
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(
            f"model.{key} must be true or false, got {value!r} ({type(value).__name__}); "
            "remove quotes or trailing commas in the yaml"
        )
    return value
