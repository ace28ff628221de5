"""Static guard on the layering data -> masking -> models -> train -> eval/cli: the lower layers
never import from medmim.train (checkpoints load through medmim.io, samplers live in medmim.data)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_lower_layers_do_not_import_train():
    offenders = []
    for layer in ("data", "masking", "models"):
        for py in (REPO / "medmim" / layer).rglob("*.py"):
            bad = sorted(m for m in _imports(py) if m.startswith("medmim.train"))
            if bad:
                offenders.append(f"{py.relative_to(REPO)}: {bad}")
    for py in [REPO / "medmim" / "io.py", REPO / "medmim" / "eval" / "metrics.py"]:
        bad = sorted(m for m in _imports(py) if m.startswith(("medmim.train", "medmim.models", "medmim.data")))
        if bad:
            offenders.append(f"{py.relative_to(REPO)}: {bad}")
    assert not offenders, offenders
