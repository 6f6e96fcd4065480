"""Typed signatures for the Lightning doors, generated from :class:`~lightning_adarank.AdaRankGradConfig`.

:class:`~lightning_adarank.AdaRankGradCallback`, :class:`~lightning_adarank.AdaRankGradStrategy` and
:class:`~lightning_adarank.AdaRankGradDDPStrategy` accept every AdaRankGrad setting as a keyword argument.
The settings are not restated in their ``def __init__``: :func:`with_adarank_settings` gives each class an
``__init__.__signature__`` with one typed keyword-only parameter per field of ``AdaRankGradConfig`` and
appends the field's documentation (from the config's docstring) to the class docstring's ``Args``. So
``inspect.signature``, ``help()``, jsonargparse and LightningCLI (``--help``, ``--...init_args.max_rank``)
see every setting, typed and documented, from the one source of truth; a field added to the config appears
everywhere without an edit here.

``lr``, ``betas``, ``eps`` and ``weight_decay`` are the exception: in the doors they default to ``None``,
meaning "keep each parameter group's value from the module's own optimizer".
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from collections.abc import Callable
from typing import Any, Optional

from ..optim.config import AdaRankGradConfig

__all__ = ["FROM_MODULE", "setting_docs", "setting_parameters", "split_settings", "with_adarank_settings"]

#: settings that, when not given to a door, come from each param group of the module's optimizer
FROM_MODULE = ("lr", "betas", "eps", "weight_decay")
_KW = inspect.Parameter.KEYWORD_ONLY


def setting_docs() -> dict[str, str]:
    """``{setting: description}`` parsed from the ``Args:`` section of :class:`AdaRankGradConfig`'s docstring."""
    doc = inspect.cleandoc(AdaRankGradConfig.__doc__ or "")
    out: dict[str, str] = {}
    in_args, current = False, None
    for line in doc.splitlines():
        if line.strip() == "Args:":
            in_args = True
            continue
        if not in_args:
            continue
        if line and not line.startswith(" "):  # the next section / paragraph
            break
        m = re.match(r"^ {4}(\w+): (.*)$", line)
        if m:
            current = m.group(1)
            out[current] = m.group(2).strip()
        elif current and line.strip():
            out[current] += " " + line.strip()
    return out


def setting_parameters() -> list[inspect.Parameter]:
    """One keyword-only parameter per field of :class:`AdaRankGradConfig` (``FROM_MODULE`` ones default to ``None``)."""
    hints = typing.get_type_hints(AdaRankGradConfig)
    params = []
    for f in dataclasses.fields(AdaRankGradConfig):
        if f.name in FROM_MODULE:
            params.append(inspect.Parameter(f.name, _KW, default=None, annotation=Optional[hints[f.name]]))  # noqa: UP045 (built at runtime for jsonargparse)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            params.append(inspect.Parameter(f.name, _KW, default=default, annotation=hints[f.name]))
    return params


def _settings_doc(indent: str) -> str:
    docs = setting_docs()
    lines = []
    for p in setting_parameters():
        text = docs.get(p.name, "an AdaRankGrad setting (see AdaRankGradConfig).")
        if p.name in FROM_MODULE:
            text += " ``None`` (default): each param group keeps the module optimizer's value."
        lines.append(f"{indent}{p.name}: {text}")
    return "\n".join(lines)


def _insert_args(doc: str, extra: str) -> str:
    """Append ``extra`` (already indented ``name: text`` lines) to the end of ``doc``'s ``Args:`` section."""
    lines = doc.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Args:"), None)
    if start is None:
        raise ValueError("with_adarank_settings: the class docstring needs an 'Args:' section")
    base = len(lines[start]) - len(lines[start].lstrip())
    end = len(lines)
    for i in range(start + 1, len(lines)):
        line = lines[i]
        if line.strip() and len(line) - len(line.lstrip()) <= base:
            end = i
            while end > start + 1 and not lines[end - 1].strip():
                end -= 1
            break
    return "\n".join(lines[:end] + extra.splitlines() + lines[end:])


def with_adarank_settings(base_init: Callable[..., Any] | None = None) -> Callable[[type], type]:
    """Class decorator: the class's ``__init__`` gets a signature that lists, after its own named parameters,
    ``base_init``'s named parameters (those of the Lightning base class the door forwards ``*args``/``**kwargs``
    to) and every AdaRankGrad setting, typed and documented in the class docstring.

    The decorated ``__init__`` must take its own parameters keyword-only and the settings through ``**kwargs``.
    """

    def decorate(cls: type) -> type:
        init = cls.__dict__["__init__"]
        own = [
            p for p in inspect.signature(init).parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        hints = typing.get_type_hints(init)
        own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in own]
        names = {p.name for p in own}
        base_params: list[inspect.Parameter] = []
        var_kw: list[inspect.Parameter] = []
        if base_init is not None:
            base_hints = typing.get_type_hints(base_init)
            for p in list(inspect.signature(base_init).parameters.values())[1:]:  # skip self
                if p.kind is p.VAR_KEYWORD:
                    var_kw = [p.replace(annotation=inspect.Parameter.empty)]
                elif p.kind is not p.VAR_POSITIONAL and p.name not in names:
                    base_params.append(p.replace(annotation=base_hints.get(p.name, p.annotation)))
        positional = [own[0]] + [p.replace(kind=p.POSITIONAL_OR_KEYWORD) for p in base_params]
        keyword = [p for p in own[1:]] + setting_parameters()
        init.__signature__ = inspect.Signature(positional + keyword + var_kw)
        cls.__doc__ = _insert_args(inspect.cleandoc(cls.__doc__ or ""), _settings_doc(" " * 4))
        return cls

    return decorate


def split_settings(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``kwargs`` → (AdaRankGrad settings, the rest)."""
    names = {f.name for f in dataclasses.fields(AdaRankGradConfig)}
    return {k: v for k, v in kwargs.items() if k in names}, {k: v for k, v in kwargs.items() if k not in names}
