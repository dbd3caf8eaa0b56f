"""YAML configuration: defaults, one level of ``base:`` include, ``--set`` overrides, strict keys.

A script declares its complete configuration as a ``DEFAULTS`` dict (the nanoGPT "defaults block").
``load_config`` layers, in order: DEFAULTS, the base file named by ``base:`` (one level, relative to
the config file), the config file itself, then each ``--set a.b=value``. Every key of every layer must
already exist in DEFAULTS: a typo is an error that lists the valid keys and the closest match, never a
silently ignored setting. An empty dict in DEFAULTS (``{}``) marks a free-form mapping (for example a
table of class weights) whose keys are not checked; tables merge key by key across layers, and
``key: null`` in a later layer empties an inherited table.

Override values are parsed as YAML (``[32,64]``, ``true``, ``null``, ``1e-4``) and type-checked
against the value they replace: int may become float, ``null`` defaults accept anything, a list stays
a list.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message names the file and key."""


def _closest(key: str, valid: Iterable[str]) -> str:
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""


def _unknown_key_message(dotted: str, key: str, valid: Iterable[str], source: str) -> str:
    valid = sorted(valid)
    return (
        f"{source}: unknown config key '{dotted}'.{_closest(key, valid)} "
        f"Valid keys here: {', '.join(valid) if valid else '(none)'}"
    )


def read_yaml(path: str | Path) -> dict:
    """Read one YAML mapping with ``yaml.safe_load``; an empty file is an empty dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with path.open("r", encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _coerce(new: Any, old: Any, dotted: str, source: str) -> Any:
    """Return ``new`` converted to the type of ``old`` where that is lossless, else raise."""
    if old is None or new is None:
        return new
    if isinstance(old, bool):
        if isinstance(new, bool):
            return new
    elif isinstance(old, int):
        if isinstance(new, int) and not isinstance(new, bool):
            return new
        if isinstance(new, float) and new.is_integer():
            return int(new)
    elif isinstance(old, float):
        if isinstance(new, (int, float)) and not isinstance(new, bool):
            return float(new)
        if isinstance(new, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(new)
            except ValueError:
                pass
    elif isinstance(old, str):
        if isinstance(new, str):
            return new
        if isinstance(new, (int, float)) and not isinstance(new, bool):
            return str(new)
    elif isinstance(old, (list, tuple)):
        if isinstance(new, (list, tuple)):
            return list(new)
    elif isinstance(old, dict):
        if isinstance(new, dict):
            return new
    raise ConfigError(
        f"{source}: '{dotted}' must be {_type_name(old)} (like the default {old!r}), "
        f"got {_type_name(new)} {new!r}"
    )


def _is_free_form(schema: Any) -> bool:
    return isinstance(schema, dict) and not schema


def merge_strict(base: dict, update: Mapping, source: str, schema: Mapping | None = None, prefix: str = "") -> dict:
    """Deep-merge ``update`` into a copy of ``base``, checking keys against ``schema`` (the DEFAULTS).

    ``schema`` defaults to ``base``. A sub-dict that is empty in the schema is free-form: its keys are
    taken as given.
    """
    schema = base if schema is None else schema
    out = copy.deepcopy(base)
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in schema:
            raise ConfigError(_unknown_key_message(dotted, str(key), schema.keys(), source))
        sub_schema = schema[key]
        old = out.get(key, sub_schema)
        if isinstance(sub_schema, dict) and sub_schema and isinstance(value, Mapping):
            out[key] = merge_strict(old if isinstance(old, dict) else {}, value, source, sub_schema, f"{dotted}.")
        elif _is_free_form(sub_schema) and isinstance(value, Mapping):
            out[key] = merge_free(old if isinstance(old, dict) else {}, value)
        elif _is_free_form(sub_schema) and value is None:  # `key: null` empties an inherited free-form table
            out[key] = {}
        else:
            out[key] = _coerce(copy.deepcopy(value), sub_schema, dotted, source)
    return out


def merge_free(base: dict, update: Mapping) -> dict:
    """Deep-merge without key checks (free-form sections, or no DEFAULTS given)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(out.get(key), dict) and isinstance(value, Mapping):
            out[key] = merge_free(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``"a.b=value"`` into (["a", "b"], parsed value); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set '{text}': expected key=value, e.g. --set train.lr=3e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set '{text}': value is not valid YAML: {exc}") from exc
    return key.split("."), value


def apply_override(cfg: dict, text: str, schema: Mapping | None = None) -> dict:
    """Apply one ``--set a.b=value`` to ``cfg`` in place (keys checked against ``schema``) and return it."""
    path, value = parse_override(text)
    update: Any = value
    for key in reversed(path):
        update = {key: update}
    merged = merge_strict(cfg, update, "--set", schema) if schema is not None else merge_free(cfg, update)
    cfg.clear()
    cfg.update(merged)
    return cfg


def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    defaults: Mapping | None = None,
) -> dict:
    """Resolve a configuration: DEFAULTS ← base file ← config file ← overrides.

    Args:
        path: YAML file; may contain ``base: other.yaml`` (relative to itself; one level only).
        overrides: strings ``"a.b=value"`` from ``--set``.
        defaults: the script's complete DEFAULTS; with it every key is checked. Without it the files
            are merged as they are and overrides may add keys.
    Returns:
        A new plain dict (the inputs are not modified), without the ``base`` key.
    """
    strict = defaults is not None
    cfg = copy.deepcopy(dict(defaults)) if defaults is not None else {}
    if path is not None:
        path = Path(path)
        data = read_yaml(path)
        base_name = data.pop("base", None)
        if base_name is not None:
            base_path = (path.parent / str(base_name)).resolve()
            base_data = read_yaml(base_path)
            if "base" in base_data:
                raise ConfigError(
                    f"{base_path}: a base config cannot itself have 'base:' (one level of include only)"
                )
            cfg = merge_strict(cfg, base_data, str(base_path), defaults) if strict else merge_free(cfg, base_data)
        cfg = merge_strict(cfg, data, str(path), defaults) if strict else merge_free(cfg, data)
    for text in overrides or ():
        apply_override(cfg, text, schema=defaults)
    return cfg


def save_config(cfg: Mapping, path: str | Path) -> Path:
    """Write the resolved config as YAML (keys in their defined order)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        yaml.safe_dump(dict(cfg), handle, sort_keys=False, allow_unicode=True)
    return path


def get_path(cfg: Mapping, dotted: str) -> Any:
    """``get_path(cfg, "train.lr")``; a missing key is a ConfigError naming it."""
    node: Any = cfg
    for depth, key in enumerate(dotted.split(".")):
        if not isinstance(node, Mapping) or key not in node:
            where = ".".join(dotted.split(".")[:depth]) or "top level"
            valid = list(node.keys()) if isinstance(node, Mapping) else []
            raise ConfigError(_unknown_key_message(dotted, key, valid, f"config ({where})"))
        node = node[key]
    return node
