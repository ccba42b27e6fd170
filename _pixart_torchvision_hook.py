"""Applies ``pixart_cli._torchvision_compat`` just before torchvision is first imported, by any code.

pixart-cli installs ``pixart_cli_torchvision.pth`` beside this module; Python runs its one line at interpreter start
(``site``), which puts ``TorchvisionHook`` first on ``sys.meta_path``. Nothing else happens at start: torch is
imported only when something imports torchvision, which imports torch itself anyway. The hook then removes itself,
so it runs at most once and costs nothing afterwards. Any failure here is ignored, leaving torchvision's own import
to report whatever is wrong.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing would slow every interpreter start
if TYPE_CHECKING:
    from collections.abc import Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType


class TorchvisionHook:
    """A meta-path finder that finds nothing: it only runs the compat fix when asked for ``torchvision``."""

    @classmethod
    def find_spec(
        cls, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname == "torchvision":
            uninstall()  # first, so that the imports below never come back here
            try:  # noqa: SIM105 - contextlib is not imported at start; keep this module's import cheap
                import pixart_cli._torchvision_compat  # noqa: F401  (declares the missing operator schemas)
            except Exception:  # this must never be the reason an import fails
                pass
        return None  # the regular finders locate torchvision


def install() -> None:
    """Put the hook first on ``sys.meta_path`` (once), unless torchvision is imported already."""
    if "torchvision" not in sys.modules and TorchvisionHook not in sys.meta_path:
        sys.meta_path.insert(0, TorchvisionHook)


def uninstall() -> None:
    while TorchvisionHook in sys.meta_path:
        sys.meta_path.remove(TorchvisionHook)
