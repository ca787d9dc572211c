"""Optional outputs beside ``metrics.csv``: TensorBoard scalars and an MLflow run, with the same numbers.

Each is opened before training (a missing package is a ``fedloom: error:`` then, not after the
last round), receives every ``metrics.csv`` row as it is written, and is closed with the run.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from fedloom.config import Config, to_toml
from fedloom.errors import ConfigError


def _flat(cfg: Config) -> dict[str, str]:
    """The config as ``section.key`` parameters (what MLflow records for a run)."""
    import tomllib

    raw = tomllib.loads(to_toml(cfg))
    return {f"{section}.{key}": str(value) for section, values in raw.items() for key, value in values.items()}


class RunOutputs:
    """The ``[log]`` outputs of one simulation run."""

    def __init__(self, cfg: Config, run_dir: Path):
        self.writer: Any = None
        self.mlflow: Any = None
        if cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("log.tensorboard", "needs TensorBoard: pip install 'fedloom[tensorboard]'") from None
            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if cfg.log.mlflow:
            try:
                import mlflow
            except ImportError:
                raise ConfigError("log.mlflow", "needs MLflow: pip install 'fedloom[mlflow]'") from None
            uri = cfg.log.mlflow
            if "://" not in uri:  # a local folder: MLflow's file store, which MLflow 3 keeps behind an opt-in
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                uri = Path(uri).resolve().as_uri()
            try:
                mlflow.set_tracking_uri(uri)
                mlflow.set_experiment(cfg.run.name)
                mlflow.start_run(run_name=run_dir.name)
                mlflow.log_params(_flat(cfg))
                mlflow.set_tag("fedloom.run_dir", str(run_dir))
            except Exception as exc:  # noqa: BLE001 - whatever MLflow raises, the run must not start half-logged
                raise ConfigError("log.mlflow", f"cannot log to MLflow at {uri}: {type(exc).__name__}: {exc}") from None
            self.mlflow = mlflow

    def log(self, row: dict[str, float]) -> None:
        """One ``metrics.csv`` row: every finite number, at step ``round``."""
        step = int(row["round"])
        values = {k: float(v) for k, v in row.items() if k != "round" and v is not None and math.isfinite(float(v))}
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if self.mlflow is not None:
            self.mlflow.log_metrics(values, step=step)

    def close(self, status: str = "FINISHED") -> None:
        if self.writer is not None:
            self.writer.close()
        if self.mlflow is not None:
            self.mlflow.end_run(status=status)
