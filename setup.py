"""Build steps pyproject.toml cannot declare: installing ``pixart_cli_torchvision.pth`` (see _pixart_torchvision_hook).

A ``.pth`` file only takes effect at the top of site-packages, i.e. at the root of the wheel. ``build_pth`` writes
it there for a regular wheel (``pip install .``) and for an editable one (``pip install -e .``); either way it is in
the wheel's RECORD, so ``pip uninstall pixart-cli`` removes it.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import Command, setup
from setuptools.command.build import build

PTH_NAME = "pixart_cli_torchvision.pth"
# Sorts after setuptools' "__editable__.*.pth", whose finder serves _pixart_torchvision_hook in an editable install.
PTH_LINE = "import _pixart_torchvision_hook; _pixart_torchvision_hook.install()\n"


class build_pth(Command):  # named like setuptools' own build steps
    description = f"write {PTH_NAME} at the root of the wheel"
    user_options: list = []  # noqa: RUF012 - distutils API

    def initialize_options(self) -> None:
        self.build_lib: str | None = None
        self.editable_mode = False  # set by setuptools' editable_wheel

    def finalize_options(self) -> None:
        self.set_undefined_options("build", ("build_lib", "build_lib"))

    def _target(self) -> Path:
        if self.editable_mode:  # an editable wheel holds what is installed into install_lib, not build_lib
            return Path(self.get_finalized_command("install").install_lib, PTH_NAME)
        return Path(self.build_lib, PTH_NAME)

    def run(self) -> None:
        target = self._target()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(PTH_LINE, encoding="utf-8")

    def get_outputs(self) -> list[str]:
        return [] if self.editable_mode else [str(self._target())]  # editable: not a file to link from build_lib

    def get_output_mapping(self) -> dict[str, str]:
        return {}


class Build(build):
    sub_commands = [*build.sub_commands, ("build_pth", None)]  # noqa: RUF012 - distutils API


setup(cmdclass={"build": Build, "build_pth": build_pth})
