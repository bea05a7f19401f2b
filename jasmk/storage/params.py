"""asmk's parameter files: :func:`load_params` reads them as asmk 0.1.1's ``io_helpers.load_params`` does, and
finds the HOW parameter sets jasmk ships (``jasmk/params/*.yml``, asmk's own values) by name.

A file may name a ``__template__``: a yaml file (path relative to the file's folder, ``~`` expanded) whose values
are the defaults. The file's values are laid over the template's key by key, recursively into nested mappings;
any other value (a list, a number, None) replaces the template's. Templates may chain; the ``__template__`` keys
are gone from the result. Only ``yaml.safe_load`` reads the files.
"""

from __future__ import annotations

import importlib.resources
import os

import yaml

__all__ = ["SUFFIXES", "TEMPLATE_KEY", "load_params", "packaged_names"]

SUFFIXES = (".yml", ".yaml")
TEMPLATE_KEY = "__template__"


def _packaged_folder():
    """The package data folder of the shipped parameter sets (``jasmk/params``)."""
    return importlib.resources.files(__package__.rpartition(".")[0]) / "params"


def packaged_names() -> list[str]:
    """The parameter sets jasmk ships, by name (templates, whose names start with ``_``, left out)."""
    return sorted(entry.name.rsplit(".", 1)[0] for entry in _packaged_folder().iterdir()
                  if entry.name.endswith(SUFFIXES) and not entry.name.startswith("_"))


def _shipped() -> str:
    return ", ".join(packaged_names())


def _read_mapping(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            content = yaml.safe_load(handle)
    except yaml.YAMLError as err:
        raise ValueError(f"asmk parameter file {path} is not valid yaml: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read the asmk parameter file {path}: {err}") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path} is not an asmk parameter file: its yaml holds a {type(content).__name__}, "
                         "not a mapping")
    return content


def _overlay(defaults, params):
    """asmk's ``dict_deep_overlay``: ``params`` over ``defaults``, merged key by key where both are mappings."""
    if isinstance(defaults, dict) and isinstance(params, dict):
        out = dict(defaults)
        for key, value in params.items():
            out[key] = _overlay(defaults.get(key), value)
        return out
    return params


def _load(path: str, chain: tuple) -> dict:
    key = os.path.realpath(path)
    if key in chain:
        raise ValueError("asmk parameter files name each other as __template__ in a cycle: "
                         + " -> ".join(chain[chain.index(key):] + (key,)))
    content = _read_mapping(path)
    if TEMPLATE_KEY not in content:
        return content
    template = content.pop(TEMPLATE_KEY)
    if not isinstance(template, str) or not template:
        raise ValueError(f"{path}: {TEMPLATE_KEY} must be the path of a yaml file, got {template!r}")
    template_path = os.path.join(os.path.dirname(path), os.path.expanduser(template))
    if not os.path.isfile(template_path):
        raise ValueError(f"{path}: its {TEMPLATE_KEY} {template!r} is not a file ({template_path})")
    return _overlay(_load(template_path, chain + (key,)), content)


def _is_path(text: str) -> bool:
    seps = (os.sep, "/") + ((os.altsep,) if os.altsep else ())
    return any(sep in text for sep in seps) or text.startswith("~") or (text.endswith(SUFFIXES)
                                                                        and os.path.isfile(text))


def load_params(path_or_name) -> dict:
    """The parameters of an asmk parameter file, its ``__template__`` chain resolved.

    Args:
        path_or_name: the path of a ``.yml`` / ``.yaml`` file (a str with a folder in it, an existing file, or
            an ``os.PathLike``), or the name of a parameter set jasmk ships (``"eccv20_how_r50-_1000"``, with or
            without ``.yml``; :func:`packaged_names` lists them).

    Returns:
        The parameters as a dict (asmk's ``load_params`` result).

    Raises:
        ValueError: no such file or packaged set (the message lists the packaged ones), a file that is not yaml
            or holds no mapping, a missing template, or templates that name each other in a cycle.
    """
    if not isinstance(path_or_name, (str, os.PathLike)):
        raise ValueError(f"load_params takes a path or a parameter set name, got {type(path_or_name).__name__}")
    text = os.fspath(path_or_name)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if isinstance(path_or_name, os.PathLike) or _is_path(text):
        path = os.path.expanduser(text)
        if not os.path.isfile(path):
            raise ValueError(f"asmk parameter file not found: {path} (jasmk ships: {_shipped()})")
        return _load(path, ())
    stem = text[: -len(next(s for s in SUFFIXES if text.endswith(s)))] if text.endswith(SUFFIXES) else text
    resource = _packaged_folder() / f"{stem}.yml"
    if not stem or not resource.is_file():
        raise ValueError(f"unknown asmk parameter set {text!r}: give the path of a .yml file or one of the sets "
                         f"jasmk ships: {_shipped()}")
    with importlib.resources.as_file(resource) as path:
        return _load(os.fspath(path), ())
