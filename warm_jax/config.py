"""Gin plumbing: where the shipped gin files live, parsing files + `--gin.NAME=VALUE` bindings.

Gin locks its config once parsed, and a binding can only name a configurable that has been
registered, so `parse` imports every module that declares configurables before parsing.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import gin

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
        gin.add_config_file_search_path(str(d))
    files = [resolve_gin_file(f) for f in gin_files]
    try:
        gin.parse_config_files_and_bindings(files, bindings, finalize_config=False)
    except (ValueError, SyntaxError, KeyError, TypeError) as e:
        raise UserError(f"invalid gin configuration: {e}") from None


def operative_config() -> str:
    return gin.operative_config_str()


def full_config() -> str:
    return gin.config_str()
