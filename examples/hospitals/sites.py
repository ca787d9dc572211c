"""Each hospital's own patient records, as the hospital would keep them, and the function one of them reads with.

The three hospitals hold the breast-cancer data split with label skew (Dirichlet, alpha = 1), each in its
own format, in ``runs/hospitals-data/``:

- ``st-mary.csv``: a table, 30 feature columns and a ``label`` column (read by ``data.path``);
- ``general.npz``: arrays ``x`` and ``y`` (read by ``data.path``);
- ``university.tsv``: its records system's export, tab-separated, the diagnosis as a word; it is read by
  :func:`university`, named in that hospital's config as ``data.loader = "examples.hospitals.sites:university"``.

No process reads another hospital's file, and the server reads none.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from fedloom.data import dirichlet, load_breast_cancer

DATA = Path("runs/hospitals-data")
DIAGNOSES = ("benign", "malignant")  # label 0 and 1 of the federation (model.num_classes = 2)


def write_sites(folder: Path = DATA) -> None:
    """Write the three hospitals' files (their rows shuffled, so each keeps a mixed test split)."""
    folder.mkdir(parents=True, exist_ok=True)
    x, y = load_breast_cancer()
    rng = np.random.default_rng(0)
    st_mary, general, uni = (rng.permutation(part) for part in dirichlet(y, 3, alpha=1.0, seed=0))
    with open(folder / "st-mary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*(f"f{i}" for i in range(x.shape[1])), "label"])
        writer.writerows([*(f"{v:.6f}" for v in x[i]), int(y[i])] for i in st_mary)
    np.savez(folder / "general.npz", x=x[general], y=y[general])
    with open(folder / "university.tsv", "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["patient", "diagnosis", *(f"measure_{i}" for i in range(x.shape[1]))])
        writer.writerows([f"U{i:04d}", DIAGNOSES[int(y[i])], *(f"{v:.6f}" for v in x[i])] for i in uni)


def university() -> tuple[np.ndarray, np.ndarray]:
    """The university hospital's ``(x, y)``: its export's measures, and the diagnosis as the label 0 or 1."""
    with open(DATA / "university.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    measures = [k for k in rows[0] if k.startswith("measure_")]
    x = np.array([[float(r[k]) for k in measures] for r in rows], dtype=np.float32)
    y = np.array([DIAGNOSES.index(r["diagnosis"]) for r in rows], dtype=np.int64)
    return x, y
