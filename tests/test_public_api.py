"""The package's public entry points: importable from the top level, loaded only on first use."""

from __future__ import annotations

import subprocess
import sys

import pytest

import pixart_cli


@pytest.mark.parametrize("name", sorted(pixart_cli._EXPORTS))
def test_top_level_exports_resolve_to_their_module(name):
    value = getattr(pixart_cli, name)
    assert value.__module__ == pixart_cli._EXPORTS[name]
    assert name in dir(pixart_cli)


def test_importing_the_package_imports_no_torch():
    code = "import sys, pixart_cli; assert 'torch' not in sys.modules; from pixart_cli import Pipeline; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_unknown_names_are_attribute_errors():
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        pixart_cli.Nothing  # noqa: B018


def test_all_lists_every_export():
    assert sorted(pixart_cli.__all__) == sorted(["__version__", *pixart_cli._EXPORTS])
