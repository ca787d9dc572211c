"""In-process simulation driven by a TOML config.

The names below are imported when first used (PEP 562), so that a light module of this package (the run
folder's ``report``, read by ``fedloom dashboard``) can be imported without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"Config": "fedloom.config", "config_from_dict": "fedloom.config", "load_config": "fedloom.config",
          "to_toml": "fedloom.config", "load_params": "fedloom.paramfiles", "RunResult": "fedloom.simulation.runner",
          "simulate": "fedloom.simulation.runner"}

__all__ = ["Config", "RunResult", "config_from_dict", "load_config", "load_params", "simulate", "to_toml"]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
