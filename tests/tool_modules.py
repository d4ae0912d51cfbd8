"""What the tool tests share: a tool loaded from tools/ as a module, and ncu report rows."""

import importlib.util
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load(name: str):
    """tools/NAME.py as a module (tools/ is no package)."""
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def row(kernel: str, grid: str, duration: str) -> list[str]:
    """One kernel's row of an `ncu --csv` report."""
    return ["1", kernel, grid, duration]


def report(*rows: list[str], unit: str = "ns") -> list[list[str]]:
    """An `ncu --csv` report around `rows`: banner, header, units, footer."""
    return [
        ["==PROF== Connected"],
        ["ID", "Kernel Name", "Grid Size", "gpu__time_duration.sum"],
        ["", "", "", unit],
        *rows,
        ["==PROF== Disconnected"],
    ]
