"""In-process simulation driven by a TOML config."""

from fedloom.config import Config, config_from_dict, load_config, to_toml
from fedloom.paramfiles import load_params
from fedloom.simulation.runner import RunResult, simulate

__all__ = ["Config", "RunResult", "config_from_dict", "load_config", "load_params", "simulate", "to_toml"]
