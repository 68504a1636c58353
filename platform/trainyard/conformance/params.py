"""Params for the checks: an entry's params typed from what the user gave (or its
defaults), shown in one line; and ``trainyard plugins check``'s PARAMS parsed."""

from __future__ import annotations

import dataclasses
from typing import Any

from trainyard.conformance.results import CheckFailed, Skip
from trainyard.errors import ConfigError


def typed(schema: type | None, values: dict, kind: str, name: str, plugin: str) -> Any:
    """``values`` as ``schema``'s typed params. :class:`CheckFailed` if the user's values
    are rejected, :class:`Skip` if the defaults are not enough (a param needs a value)."""
    from trainyard.config import typed_params

    try:
        return typed_params(schema, values, f"{'model' if kind == 'model' else 'data'}.params")
    except ConfigError as exc:
        if values:
            raise CheckFailed(f"the params given are rejected: {exc}") from None
        raise Skip(
            f"needs params ({exc}); check it with `trainyard plugins check {plugin} "
            f"{kind}.{name}.KEY=VALUE`"
        ) from None


def params_detail(params: Any) -> str:
    """Typed params in one line, whole (a terminal's table folds or cuts it to fit; a log or a
    file gets every value)."""
    if params is None:
        return "no params"
    if dataclasses.is_dataclass(params):
        return ", ".join(f"{f.name}={getattr(params, f.name)!r}" for f in dataclasses.fields(params))
    return repr(params)


def parse_param_overrides(items: list[str] | tuple[str, ...]) -> tuple[dict, dict]:
    """``["model.bert.hidden_size=32", "dataset.table.path=x.csv"]`` to
    ``(model_params, dataset_params)``. Raises ConfigError."""
    from omegaconf import OmegaConf

    from trainyard.config import parse_overrides

    parsed = OmegaConf.to_container(parse_overrides(list(items))) if items else {}
    unknown = sorted(set(parsed) - {"model", "dataset"})
    bad = [k for k in ("model", "dataset") if k in parsed and not all(
        isinstance(v, dict) for v in (parsed[k] or {}).values())] if isinstance(parsed, dict) else []
    if unknown or bad:
        raise ConfigError(
            "check params are model.NAME.KEY=VALUE or dataset.NAME.KEY=VALUE "
            f"(got {', '.join(unknown + bad)})"
        )
    return parsed.get("model") or {}, parsed.get("dataset") or {}
