"""The one configuration mechanism of every command: a dataclass (sections may be nested
dataclasses) filled, in this order, from its defaults, a YAML file, the command's explicit
flags and ``key=value`` overrides (dotted for nested sections, values read as YAML scalars),
then checked by the dataclass's own ``validate()``. Every problem is one :class:`ConfigError`
(a ``ValueError``) that names the field. Imports no torch."""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the field."""


def split_override(text: str) -> tuple[str, str]:
    """``"train.epochs=3"`` -> ``("train.epochs", "3")``."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. epochs=3)")
    return key.strip(), value.strip()


def parse_override(text: str) -> tuple[str, str, str]:
    """``"optim.lr=1e-3"`` -> ``("optim", "lr", "1e-3")`` (a key with a section)."""
    key, sep, value = text.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not name:
        raise ConfigError(f"override {text!r} is not of the form section.field=value "
                          f"(e.g. optim.lr=1e-3)")
    return section, name, value.strip()


def _base(hint):
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next((a for a in args if a is not type(None)), hint), type(None) in args
    return hint, False


def coerce(value, hint, name: str):
    """``value`` (from YAML or a ``key=value`` string) as the type ``hint`` of field ``name``."""
    base, optional = _base(hint)
    if optional and (value is None or (isinstance(value, str)
                                       and value.strip().lower() in ("none", "null", "~"))):
        return None
    origin = typing.get_origin(base)
    if origin in (list, tuple):
        items = [s.strip() for s in value.split(",") if s.strip()] if isinstance(value, str) \
            else value
        if isinstance(items, (int, float)) and not isinstance(items, bool):
            items = [items]  # YAML "mean: 0.15" for a list field: one value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        item_hint = (typing.get_args(base) or (str,))[0]
        return origin(coerce(v, item_hint, f"{name}[]") for v in items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    try:
        if base is bool:
            if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
                return False
            if isinstance(value, bool):
                return value
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() \
                else int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        raise ConfigError(f"{name}: unsupported field type {hint}")
    expected = getattr(base, "__name__", str(base)) + (" or null" if optional else "")
    raise ConfigError(f"{name} must be {expected}, got {value!r}")


def _hints(obj) -> dict:
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


def set_value(obj, key: str, value, origin: str = "override", path: str = ""):
    """Set the (dotted) field ``key`` of the dataclass ``obj`` (``path``: where ``obj`` lies in
    the whole config, for messages); ``ConfigError`` naming the full key when it is unknown or
    ``value`` has the wrong type."""
    head, dot, rest = key.partition(".")
    hints = _hints(obj)
    full = path + head
    if head not in hints:
        raise ConfigError(f"{origin}: unknown field {full}; {path.rstrip('.') or type(obj).__name__}"
                          f" has {', '.join(hints)}")
    current = getattr(obj, head)
    if dot:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"{origin}: {full} has no fields ({path}{key})")
        set_value(current, rest, value, origin, full + ".")
    elif dataclasses.is_dataclass(current):
        apply_mapping(current, value, origin, full + ".")
    else:
        setattr(obj, head, coerce(value, hints[head], full))
    return obj


def apply_mapping(obj, values, origin: str, path: str = ""):
    """Set every entry of ``values`` (a mapping; nested mappings fill nested sections)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{origin}: {path.rstrip('.') or 'the config'} must be a mapping, "
                          f"got {values!r}")
    for key, value in values.items():
        set_value(obj, str(key), value, origin, path)
    return obj


def read_yaml(path) -> dict:
    import yaml
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the config must be a mapping of fields")
    return dict(values)


def scalar(text: str):
    """A ``key=value`` value read as a YAML scalar (``3`` -> 3, ``none`` stays text)."""
    import yaml
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (int, float, bool, str, list, dict)) or value is None \
        else text


def build(cfg, config_file=None, flags: dict | None = None, overrides=()):
    """``cfg`` (a dataclass instance holding the defaults) <- the YAML file <- ``flags``
    (``{dotted key: value}`` of the flags given explicitly) <- ``overrides``
    (``["key=value", ...]``); then ``cfg.validate()`` when it has one. Every problem raises
    :class:`ConfigError`."""
    if config_file is not None:
        apply_mapping(cfg, read_yaml(config_file), str(config_file))
    for key, value in (flags or {}).items():
        set_value(cfg, key, value, "flag")
    for text in overrides or ():
        key, value = split_override(text)
        set_value(cfg, key, scalar(value), "--set")
    if hasattr(cfg, "validate"):
        try:
            cfg.validate()
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
    return cfg


def field_default(cls, name: str):
    """The default of the (dotted) field ``name`` of the dataclass ``cls``."""
    head, dot, rest = name.partition(".")
    for f in dataclasses.fields(cls):
        if f.name == head:
            if f.default is not dataclasses.MISSING:
                value = f.default
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                raise KeyError(f"{cls.__name__}.{head} has no default")
            return field_default(type(value), rest) if dot else value
    raise KeyError(f"{cls.__name__} has no field {head!r}")


def show(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def help_for(cls, name: str, text: str = "") -> str:
    """Help text ``"text (default: <the field's default>)"``, read from the dataclass, so a
    default is written in one place; ``%`` is escaped for argparse."""
    shown = show(field_default(cls, name)).replace("%", "%%")
    return f"{text} (default: {shown})" if text else f"default: {shown}"
