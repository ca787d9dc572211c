"""Model parameters as a list of numpy arrays, and the helpers that move between forms.

A model's parameters travel as ``Params``: a list of numpy arrays in a fixed order (the order
of ``nn.Module.parameters()`` for PyTorch models). ``ParamSpec`` records the shapes and dtypes
that every update must match; ``flatten``/``unflatten`` convert to and from one vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedloom.errors import ShapeError

Params = list[np.ndarray]


@dataclass(frozen=True)
class ParamSpec:
    """Shapes and dtypes of a list of parameter arrays."""

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @classmethod
    def of(cls, params: Params) -> ParamSpec:
        return cls(tuple(tuple(p.shape) for p in params), tuple(p.dtype.str for p in params))

    @property
    def sizes(self) -> list[int]:
        return [int(np.prod(s, dtype=np.int64)) for s in self.shapes]

    @property
    def num_elements(self) -> int:
        return sum(self.sizes)

    def check(self, params: Params, *, client_id: int | None = None, stage: str | None = None) -> None:
        """Raise :class:`ShapeError` unless ``params`` has exactly these shapes and dtypes."""
        if len(params) != len(self.shapes):
            raise ShapeError(
                f"expected {len(self.shapes)} arrays, got {len(params)}", client_id=client_id, stage=stage
            )
        for i, (p, shape, dtype) in enumerate(zip(params, self.shapes, self.dtypes)):
            if not isinstance(p, np.ndarray):
                raise ShapeError(f"array {i} is {type(p).__name__}, not a numpy array",
                                 client_id=client_id, stage=stage)
            if tuple(p.shape) != shape or p.dtype.str != dtype:
                raise ShapeError(
                    f"array {i} is {p.dtype.str}{list(p.shape)}, expected {dtype}{list(shape)}",
                    client_id=client_id,
                    stage=stage,
                )


def flatten(params: Params) -> np.ndarray:
    """Concatenate all arrays into one float32 vector (a copy)."""
    if not params:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([np.asarray(p, dtype=np.float32).ravel() for p in params])


def unflatten(vector: np.ndarray, spec: ParamSpec) -> Params:
    """Split a vector made by :func:`flatten` back into arrays of ``spec``'s shapes and dtypes."""
    vector = np.asarray(vector)
    if vector.ndim != 1 or vector.size != spec.num_elements:
        raise ShapeError(f"vector of shape {list(vector.shape)} does not hold {spec.num_elements} elements")
    out, start = [], 0
    for shape, dtype, size in zip(spec.shapes, spec.dtypes, spec.sizes):
        out.append(vector[start : start + size].reshape(shape).astype(np.dtype(dtype), copy=True))
        start += size
    return out


def is_finite(params: Params) -> bool:
    """True when no array holds NaN or Inf."""
    return all(bool(np.isfinite(p).all()) for p in params)


def subtract(a: Params, b: Params) -> Params:
    """Element-wise ``a - b`` (new arrays)."""
    return [x - y for x, y in zip(a, b)]
