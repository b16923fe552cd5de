"""Gin plumbing: where the shipped gin files live, parsing files + `--gin.NAME=VALUE` bindings.

Gin locks its config once parsed, and a binding can only name a configurable that has been
registered, so `parse` imports every module that declares configurables before parsing.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import sys
import tokenize
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gin
import gin.config as gin_internals

from warm_jax.errors import UserError

# Modules whose import registers gin configurables. Kept in one list so a binding in any gin file
# can reach any of them, whatever subcommand runs.
CONFIGURABLE_MODULES = (
    "warm_jax.models.transformer",
    "warm_jax.sharding",
    "warm_jax.training.loop",
    "warm_jax.experiments.pretrain",
    "warm_jax.experiments.sft",
    "warm_jax.experiments.quickstart",
    "warm_jax.policy.sampling",
    "warm_jax.policy.reinforce",
    "warm_jax.policy.warp",
    "warm_jax.experiments.rl",
    "warm_jax.reward.data",
    "warm_jax.reward.members",
    "warm_jax.experiments.reward_models",
    "warm_jax.experiments.figures",
)


class _QuietSearchMisses(logging.Filter):
    """Gin logs an ERROR for every search path an `include` does not match before it finds the
    file in the next one; those misses are not errors for us (a real miss raises)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("Path not found:")


logging.getLogger().addFilter(_QuietSearchMisses())


def gin_dirs() -> list[Path]:
    """Directories searched for gin files: the source tree's `gin/`, then the installed copy."""
    dirs = [Path(__file__).resolve().parent.parent / "gin", Path(sys.prefix) / "share/warm_jax/gin"]
    return [d for d in dirs if d.is_dir()]


def shipped_gin_files() -> list[str]:
    """Gin files shipped with the project, relative to the gin directory (for `--help`)."""
    for d in gin_dirs():
        return sorted(p.relative_to(d).as_posix() for p in d.glob("**/*.gin"))
    return []


def resolve_gin_file(name: str) -> str:
    """A path as given if it exists, else looked up under the shipped gin directories."""
    p = Path(name)
    if p.is_file():
        return str(p)
    for d in gin_dirs():
        for candidate in (d / name, d / f"{name}.gin"):
            if candidate.is_file():
                return str(candidate)
    known = ", ".join(shipped_gin_files()) or "(none)"
    raise UserError(f"gin file not found: {name!r}. Shipped gin files: {known}")


def import_configurables(extra: Sequence[str] = ()) -> None:
    for mod in (*CONFIGURABLE_MODULES, *extra):
        importlib.import_module(mod)


def parse(gin_files: Sequence[str], bindings: Sequence[str], extra_modules: Sequence[str] = ()):
    """Parses gin files and bindings; any gin error becomes a UserError naming file/line/binding."""
    import_configurables(extra_modules)
    gin.clear_config()
    for d in gin_dirs():
        # Gin keeps search paths across clear_config(): add each once, not once per parse.
        if str(d) not in gin_internals._LOCATION_PREFIXES:
            gin.add_config_file_search_path(str(d))
    files = [resolve_gin_file(f) for f in gin_files]
    try:
        gin.parse_config_files_and_bindings(files, bindings, finalize_config=False)
    # Gin lets through whatever its tokenizer, `include` (OSError) or `import` lines raise.
    except (
        ValueError,
        SyntaxError,
        KeyError,
        TypeError,
        tokenize.TokenError,
        ImportError,
        OSError,
    ) as e:
        raise UserError(f"invalid gin configuration: {e}") from None
    check_bound_values()


_SIMPLE_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "None": type(None)}


def _accepted_types(annotation: Any, default: Any) -> set[type] | None:
    """The Python types a parameter takes, from a simple annotation (int, float, bool, str, None
    and unions of them) or else from its default; None when neither says."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    names = [t.strip() for t in text.split("|")] if text else []
    if names and all(n in _SIMPLE_TYPES for n in names):
        return {_SIMPLE_TYPES[n] for n in names}
    if isinstance(default, (bool, int, float, str, tuple, list)):
        kinds = {type(default)} | ({type(None)} if "None" in names else set())
        return kinds | ({tuple, list} if isinstance(default, (tuple, list)) else set())
    return None


def _fits(value: Any, kinds: set[type]) -> bool:
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, int) and float in kinds:
        return True
    return any(isinstance(value, k) for k in kinds if k is not bool)


def _parameter_types(fn: Any) -> dict[str, tuple[Any, Any]]:
    """{name: (annotation, default)} of a configurable; for one taking **kwargs that builds a
    dataclass (`model_config(**overrides) -> TransformerConfig`), the dataclass's fields."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return {}
    out = {
        n: (p.annotation, p.default)
        for n, p in sig.parameters.items()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    if any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        ret = sig.return_annotation
        ret = getattr(fn, "__globals__", {}).get(ret, ret) if isinstance(ret, str) else ret
        if dataclasses.is_dataclass(ret):
            for f in dataclasses.fields(ret):
                out.setdefault(f.name, (f.type, f.default))
    return out


def _resolve_macro(value: Any, where: str) -> Any:
    seen = set()
    while (
        isinstance(value, gin_internals.ConfigurableReference)
        and value.configurable.selector == "gin.macro"
    ):
        key = value.config_key
        if key in seen or key not in gin_internals._CONFIG:
            raise UserError(f"gin binding {where}: macro %{key[0]} is not defined")
        seen.add(key)
        value = gin_internals._CONFIG[key].get("value")
    return value


def check_bound_values() -> None:
    """Checks every parsed binding against its parameter's type. Gin accepts any literal for any
    parameter, so `--gin.train.num_steps=abc` would otherwise fail deep inside the job with a
    TypeError (or a JAX shape error) instead of a message naming the binding."""
    for (scope, selector), params in list(gin_internals._CONFIG.items()):
        if selector == "gin.macro":
            continue
        configurable = gin_internals._REGISTRY.get_match(selector)
        if configurable is None:
            continue
        types = _parameter_types(configurable.wrapped)
        for name, value in params.items():
            where = f"{scope + '/' if scope else ''}{configurable.name}.{name}"
            value = _resolve_macro(value, where)
            if name not in types or isinstance(value, gin_internals.ConfigurableReference):
                continue
            kinds = _accepted_types(*types[name])
            if kinds is not None and not _fits(value, kinds):
                wanted = " or ".join(sorted(k.__name__ for k in kinds))
                raise UserError(f"gin binding {where} = {value!r}: expected {wanted}")


def operative_config() -> str:
    return gin.operative_config_str()


def full_config() -> str:
    return gin.config_str()
