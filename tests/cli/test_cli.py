"""The command line: help for every command, and the typed-config validator behind recipes and checkpoints."""

from __future__ import annotations

import dataclasses
import re

import pytest
from typer.testing import CliRunner

from pixart_cli.cli import app
from pixart_cli.config import ConfigError, apply_overrides, from_dict, to_dict
from pixart_cli.errors import PixartError
from pixart_cli.models import PixArtConfig

runner = CliRunner()
COMMANDS = sorted(c.name or c.callback.__name__ for c in app.registered_commands)


def test_top_level_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("convert", "init-from-dit"):
        assert command in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_shows_no_type_for_flags_and_upper_case_positionals(command):
    """A flag takes no value (no ``<bool>``, not even for --help); positionals read alike: RECIPE, SRC, PROMPTS."""
    result = runner.invoke(app, [*([command] if command else []), "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output
    usage = next(line for line in result.output.splitlines() if "Usage:" in line)
    positionals = re.findall(r"[{\[]([^\]}]+)[}\]]", usage.split("[OPTIONS]", 1)[1])
    assert all(name in ("ARGS", "COMMAND") or name == name.upper() for name in positionals), usage
    if command in ("convert", "train", "sample", "init-from-dit", "prepare"):
        assert positionals and all(name.isupper() for name in positionals), usage


def test_prepare_reports_a_missing_dataset_before_missing_options(tmp_path):
    """The positional argument is checked first: a missing dataset is named before the missing --vae."""
    result = runner.invoke(app, ["prepare", str(tmp_path / "no-such-dir")])
    assert result.exit_code == 2
    assert result.output.startswith("error:") and "no such dataset" in result.output, result.output
    assert "--vae" not in result.output
    from pixart_cli.data.cache import PrepareSettings, prepare

    with pytest.raises(PixartError, match="must be positive"):  # the library's settings are checked when built
        PrepareSettings(resolution=0, batch_size=0)
    with pytest.raises(PixartError, match="no such dataset"):  # then the dataset, before anything is written
        prepare(tmp_path / "no-such-dir", tmp_path / "cache", PrepareSettings(resolution=16), t5=None, vae="none")
    assert not (tmp_path / "cache").exists()


def test_unknown_option_is_a_usage_error():
    result = runner.invoke(app, ["convert", "x", "-o", "y", "--to", "onnx"])
    assert result.exit_code == 2


def test_config_round_trip_and_dotted_errors():
    config = PixArtConfig(depth=3, hidden_size=48, num_heads=4, variant="x")
    assert from_dict(PixArtConfig, to_dict(config)) == config
    with pytest.raises(ConfigError, match=r"^model\.dpeth: unknown key"):
        from_dict(PixArtConfig, {"dpeth": 3}, "model")
    with pytest.raises(ConfigError, match=r"^model\.depth: expected an integer, got str"):
        from_dict(PixArtConfig, {"depth": "3"}, "model")
    with pytest.raises(ConfigError, match=r"^model\.learn_sigma: expected true or false"):
        from_dict(PixArtConfig, {"learn_sigma": 1}, "model")
    with pytest.raises(ConfigError, match=r"^model: hidden_size 50 is not divisible"):
        from_dict(PixArtConfig, {"hidden_size": 50, "num_heads": 4}, "model")
    assert from_dict(PixArtConfig, {"mlp_ratio": "4e0"}).mlp_ratio == 4.0  # PyYAML reads 4e0 as a string


@dataclasses.dataclass(frozen=True)
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)


@dataclasses.dataclass(frozen=True)
class Recipe:
    optim: Optim = Optim()
    name: str | None = None


def test_overrides_go_through_the_validator():
    data = apply_overrides({"optim": {"lr": 1.0}}, ["optim.lr=2e-5", "optim.betas=[0.8, 0.9]", "name=run"])
    assert from_dict(Recipe, data) == Recipe(Optim(2e-5, (0.8, 0.9)), "run")
    with pytest.raises(ConfigError, match=r"^optim\.lrr: unknown key"):
        from_dict(Recipe, apply_overrides({}, ["optim.lrr=1"]))
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["optim.lr"])


def test_the_command_line_starts_without_heavy_libraries():
    """`pixart --help` and argument errors must answer at once: importing the CLI loads no torch, numpy, diffusers,
    transformers or accelerate (each command imports what it needs when it runs)."""
    import subprocess
    import sys

    heavy = ("torch", "numpy", "diffusers", "transformers", "accelerate", "PIL")
    code = f"import sys, pixart_cli.cli; print([m for m in {heavy!r} if m in sys.modules])"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]", loaded
