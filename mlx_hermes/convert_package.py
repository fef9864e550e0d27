"""The converter package, for the `convert` command and the tests.

Installed, it is `mlx_hermes_convert`; a source checkout (as on the GPU
machine, run with PYTHONPATH) has only the `convert/` folder, imported here
under that name. The runtime never imports it: the converter depends on the
runtime, not back.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from .errors import HermesError


def converter_package():
    """The converter package: installed as mlx_hermes_convert, or convert/ in a
    source checkout."""
    try:
        return importlib.import_module("mlx_hermes_convert")
    except ImportError:
        folder = Path(__file__).resolve().parent.parent / "convert"
        spec = importlib.util.spec_from_file_location(
            "mlx_hermes_convert", folder / "__init__.py", submodule_search_locations=[str(folder)])
        if spec is None:
            raise HermesError("the converter is not installed (no convert/ folder)") from None
        module = importlib.util.module_from_spec(spec)
        sys.modules["mlx_hermes_convert"] = module
        spec.loader.exec_module(module)
        return module
