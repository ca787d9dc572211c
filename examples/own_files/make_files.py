"""Write the two example data sets as a user would have them, from data bundled with fedloom:

- ``clinics.csv``: one table, a row per patient, 30 numeric features, a ``label`` column and a
  ``site`` column naming the clinic (breast-cancer data, the sites given different mixes);
- ``scans/``: one ``.npz`` per site with ``x`` (8x8 grey images, shape (n, 1, 8, 8)) and ``y``
  (the digit), each site seeing mostly a few digits (non-IID).

    python examples/own_files/make_files.py [OUT_DIR]     # default: examples/own_files/
"""

import csv
import sys
from pathlib import Path

import numpy as np

from fedloom.data import dirichlet, load_breast_cancer, load_digits


def main(out: Path) -> None:
    x, y = load_breast_cancer()
    sites = ["north", "harbour", "valley", "airport", "old-town"]
    site_of = np.empty(len(y), dtype=object)
    for name, part in zip(sites, dirichlet(y, len(sites), alpha=1.0, seed=0)):
        site_of[part] = name
    with open(out / "clinics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*(f"f{i}" for i in range(x.shape[1])), "label", "site"])
        for row, label, site in zip(x, y, site_of):
            writer.writerow([*(f"{v:.5f}" for v in row), int(label), site])
    images, digits = load_digits()
    (out / "scans").mkdir(exist_ok=True)
    for k, part in enumerate(dirichlet(digits, 8, alpha=0.3, seed=0)):
        np.savez(out / "scans" / f"site-{k}.npz", x=images[part], y=digits[part])
    print(f"wrote {out / 'clinics.csv'} and {len(list((out / 'scans').iterdir()))} files in {out / 'scans'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
