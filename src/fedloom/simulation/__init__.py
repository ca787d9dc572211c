"""In-process simulation driven by a TOML config."""

from fedloom.simulation.config import Config, config_from_dict, load_config, to_toml
from fedloom.simulation.runner import RunResult, load_params, simulate

__all__ = ["Config", "RunResult", "config_from_dict", "load_config", "load_params", "simulate", "to_toml"]
