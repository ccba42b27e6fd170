"""Make torchvision importable beside a CPU build of torch.

The only torchvision release that matches torch 2.13.0 (0.28.0) is published on PyPI as a CUDA build. Beside
the CPU torch wheel its compiled extension does not load, and its Python side then fails at import time with
``operator torchvision::nms does not exist`` while registering fake kernels for those operators. transformers,
diffusers and clean-fid import torchvision when it is installed, so that failure would break all of them.

Declaring the two operator schemas before torchvision is first imported lets its import succeed. Transforms,
datasets and model definitions (all we use, e.g. clean-fid's Inception) then work; torchvision's compiled ops
(``nms``, ``roi_align``, ...) stay unavailable, and calling them raises as before.

This module must be imported before anything imports torchvision. Installing pixart-cli (``pip install .`` or
``-e .``) puts ``pixart_cli_torchvision.pth`` in site-packages, so every interpreter of that environment applies it
first, whatever it runs: the ``.pth`` installs a meta-path hook (``_pixart_torchvision_hook`` at the top level)
that imports this module when torchvision is about to be imported, and nothing earlier (torch is not imported at
start). ``pixart_cli/__init__.py`` imports it too, for a source tree run without installing. It changes nothing
where torchvision's extension loads (a matching CUDA or CPU build): that is checked by loading the extension first,
since declaring the schemas there would make torchvision's own registration abort.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path

import torch

_library: torch.library.Library | None = None  # kept alive: the schemas vanish with the object


def _extension_loads(spec: importlib.machinery.ModuleSpec) -> bool:
    """Whether torchvision's compiled extension loads here (then it registers the real operators itself)."""
    for folder in spec.submodule_search_locations or []:
        for candidate in Path(folder).glob("_C*.so"):
            try:
                torch.ops.load_library(str(candidate))
                return True
            except OSError:
                return False
    return False


def _install() -> None:
    global _library
    spec = importlib.util.find_spec("torchvision")
    if _library is not None or spec is None:
        return
    try:
        torch.ops.torchvision.nms  # noqa: B018 - present when torchvision's extension already loaded
        return
    except (AttributeError, RuntimeError):
        pass
    if _extension_loads(spec):  # a matching build (e.g. CUDA torch + CUDA torchvision): nothing to fix
        return
    _library = torch.library.Library("torchvision", "DEF")
    _library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


_install()
