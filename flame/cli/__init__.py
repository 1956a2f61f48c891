"""The `flame` command's subcommands (flame.cli.app assembles them) and the option spelling they share."""

import dataclasses
from collections.abc import Iterable, Mapping

from flame.config import TrainConfig

_DEFAULTS = dataclasses.asdict(TrainConfig())


def flag(name: str, on: bool = True) -> str:
    """The command line's spelling of option `name`: share_casts -> --share-casts, or --no-share-casts when off."""
    return f"--{'' if on else 'no-'}{name.replace('_', '-')}"


def changed_switches(values: Mapping[str, bool], names: Iterable[str]) -> list[str]:
    """The flags of the on/off options `names` that `values` sets otherwise than `flame train`'s defaults."""
    return [flag(name, values[name]) for name in names if values[name] != _DEFAULTS[name]]
