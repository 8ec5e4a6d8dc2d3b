"""lfm_core must not import the orchestration stack."""

import ast
import pathlib
import subprocess
import sys

FORBIDDEN = {"ray", "mlflow", "boto3", "omegaconf"}
CORE = pathlib.Path(__file__).resolve().parents[1] / "lfm_core"


def test_no_forbidden_import_statements():
    offenders = []
    for path in CORE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []


def test_importing_every_core_module_loads_none_of_them():
    """boto3 is left out here: accelerate's own config module imports it when installed."""
    modules = sorted(
        p.stem for p in CORE.glob("*.py") if p.stem not in {"__init__", "__main__", "demo"}
    )
    assert {"classifier", "coarse_to_fine", "features", "flops", "paths", "train"} <= set(modules)
    code = (
        "import sys, importlib\n"
        f"for m in {modules!r}: importlib.import_module('lfm_core.' + m)\n"
        f"print(sorted(m for m in {sorted(FORBIDDEN - {'boto3'})!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
