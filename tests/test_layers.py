"""The layers of docs/architecture.md: simulation/ and deploy/ are siblings that never import each other,
and what both stand on imports neither."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "fedloom"


def imports(package: str) -> dict[str, set[str]]:
    """Every fedloom module each file of ``package`` imports (at any depth of the file)."""
    out = {}
    for path in sorted((SRC / package).rglob("*.py")) if (SRC / package).is_dir() else [SRC / f"{package}.py"]:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        out[str(path.relative_to(SRC))] = {n for n in names if n.startswith("fedloom")}
    return out


@pytest.mark.parametrize("package, forbidden", [
    ("deploy", ("fedloom.simulation",)),
    ("simulation", ("fedloom.deploy",)),
    ("transport", ("fedloom.simulation", "fedloom.deploy")),
    ("server", ("fedloom.simulation", "fedloom.deploy", "fedloom.transport")),
    ("client", ("fedloom.simulation", "fedloom.deploy", "fedloom.transport")),
    ("config", ("fedloom.simulation", "fedloom.deploy")),
    ("build", ("fedloom.simulation", "fedloom.deploy")),
    ("rounds", ("fedloom.simulation", "fedloom.deploy")),
    ("compression", ("fedloom.simulation", "fedloom.deploy", "fedloom.transport", "fedloom.server", "fedloom.client",
                     "fedloom.build", "fedloom.config")),
])
def test_a_layer_imports_nothing_above_or_beside_it(package, forbidden):
    bad = {f: sorted(m for m in mods if m.startswith(forbidden)) for f, mods in imports(package).items()}
    assert not {f: m for f, m in bad.items() if m}
