"""Prompt completion is recorded in a checkpoint (``meta.prompt_completion``), not inferred from its T5's path."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pixart_cli.checkpoints.format import CONFIG_FILE, load_checkpoint, read_config, save_checkpoint
from pixart_cli.cli import app
from pixart_cli.components.resolve import resolve_builtin
from pixart_cli.errors import PixartError
from pixart_cli.sampling.pipeline import Pipeline, check_prompt_completion
from pixart_cli.shapesworld.demo import SHAPES_DEMO, SHAPES_T5_ROLES
from pixart_cli.shapesworld.prompts import complete_prompt

runner = CliRunner()


def _demo_copy(directory: Path, prompt_completion: str | None) -> Path:
    """The shipped demo copied to ``directory``; ``prompt_completion`` None leaves the key out, as checkpoints
    written before it existed did."""
    shutil.copytree(resolve_builtin(SHAPES_DEMO), directory)
    config = yaml.safe_load((directory / CONFIG_FILE).read_text())
    config["meta"].pop("prompt_completion")
    if prompt_completion is not None:
        config["meta"]["prompt_completion"] = prompt_completion
    (directory / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
    return directory


def test_the_demo_records_its_completion():
    assert read_config(resolve_builtin(SHAPES_DEMO))[1].prompt_completion == "shapesworld"
    check_prompt_completion(SHAPES_DEMO)  # --complete-prompts is allowed
    assert Pipeline.from_pretrained(SHAPES_DEMO, device="cpu").prompt_completion is complete_prompt
    assert Pipeline.from_pretrained(SHAPES_DEMO, device="cpu", complete_prompts=False).prompt_completion is None


def test_completion_follows_the_checkpoint_not_the_text_encoders_path(tmp_path):
    """The old rule matched the T5's path: a model reading the demo's T5 completed, one reading a copy of it did
    not. Now only what the checkpoint records counts, whichever T5 reads the prompts."""
    t5_copy = shutil.copytree(resolve_builtin(SHAPES_T5_ROLES), tmp_path / "t5-copy")
    recorded = _demo_copy(tmp_path / "recorded", "shapesworld")
    assert Pipeline.from_pretrained(recorded, t5=str(t5_copy), device="cpu").prompt_completion is complete_prompt

    old = _demo_copy(tmp_path / "old", None)  # reads builtin:shapes-t5-roles, which the old rule matched
    assert read_config(old)[1].text_encoder == SHAPES_T5_ROLES
    assert load_checkpoint(old).meta.prompt_completion is None  # an older checkpoint loads as it did
    assert Pipeline.from_pretrained(old, device="cpu").prompt_completion is None
    for check in (
        lambda: Pipeline.from_pretrained(old, device="cpu", complete_prompts=True),
        lambda: check_prompt_completion(old, t5=SHAPES_T5_ROLES),
    ):
        with pytest.raises(PixartError, match="prompt completion knows only the ShapesWorld captions"):
            check()
    result = runner.invoke(app, ["sample", "a red circle", "-m", str(old), "--complete-prompts", "-o",
                                 str(tmp_path / "out"), "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 2 and "meta.prompt_completion" in result.stderr, result.output
    assert not (tmp_path / "out").exists()


def test_the_key_is_written_only_when_set_and_checked_when_read(tmp_path):
    """Without a completion, config.yaml is what it was before the key existed (older versions read it)."""
    import dataclasses

    checkpoint = load_checkpoint(SHAPES_DEMO)
    plain = save_checkpoint(
        dataclasses.replace(checkpoint, meta=dataclasses.replace(checkpoint.meta, prompt_completion=None)),
        tmp_path / "plain",
    )
    assert "prompt_completion" not in yaml.safe_load((plain / CONFIG_FILE).read_text())["meta"]
    assert load_checkpoint(plain).meta.prompt_completion is None
    completing = save_checkpoint(checkpoint, tmp_path / "completing")
    assert yaml.safe_load((completing / CONFIG_FILE).read_text())["meta"]["prompt_completion"] == "shapesworld"
    unknown = _demo_copy(tmp_path / "unknown", "limericks")
    with pytest.raises(PixartError, match=r"meta\.prompt_completion: must be one of 'shapesworld'"):
        load_checkpoint(unknown)
