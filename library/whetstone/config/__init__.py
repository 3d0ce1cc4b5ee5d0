"""Pydantic config models and the YAML + ``key=value`` loader."""

from whetstone.config.base import (
    ConfigError,
    StorageConfig,
    StrictModel,
    apply_overrides,
    dump_config,
    load_config,
    validate_config,
)

__all__ = [
    "ConfigError",
    "StorageConfig",
    "StrictModel",
    "apply_overrides",
    "dump_config",
    "load_config",
    "validate_config",
]
