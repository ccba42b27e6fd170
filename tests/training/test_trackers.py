"""`log.trackers`: TensorBoard and W&B (offline) receive exactly the metrics metrics.jsonl and validation.jsonl hold."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pixart_cli.cli import app
from tests.training.test_train import ROOT, one_line_error, stage2_args, world  # noqa: F401  (world: fixture)

runner = CliRunner()
STAGE2 = str(ROOT / "recipes" / "stage2.yaml")


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline W&B run file: a 7-byte header, then a LevelDB log (32 KiB blocks of records,
    each with a 7-byte header: crc, length, type FULL/FIRST/MIDDLE/LAST) of protobuf ``Record`` messages."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending, rows = run_file.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items})
    return rows


def test_tensorboard_and_offline_wandb_receive_every_logged_metric(world, tmp_path, monkeypatch):  # noqa: F811
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")  # belt and braces: the recipe says offline too
    run = tmp_path / "run"
    manifest, cache = world / "captions" / "manifest.jsonl", world / "cache"
    held_out = f"validation={{every: 3, batches: 1, path: {manifest}, cache: {cache}}}"
    args = [*stage2_args(world, run, steps=6, batch=4), "--set", "log.every=2", "--set", held_out,
            "--set", "log.trackers=[tensorboard, wandb]", "--set", "log.wandb_mode=offline"]  # fmt: skip
    result = runner.invoke(app, ["train", STAGE2, *args])
    assert result.exit_code == 0, result.output
    logged = {
        (f"train/{key}", record["step"]): value
        for record in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        for key, value in record.items()
        if key != "step"
    }
    for record in map(json.loads, (run / "validation.jsonl").read_text().splitlines()):
        logged["validation/loss", record["step"]] = record["val_loss"]
    assert {step for _, step in logged} == {2, 3, 4, 6}

    board = EventAccumulator(str(next((run / "tensorboard").iterdir())))
    board.Reload()
    tensorboard = {(tag, event.step): event.value for tag in board.Tags()["scalars"] for event in board.Scalars(tag)}
    assert tensorboard.keys() == logged.keys()
    assert all(tensorboard[key] == pytest.approx(value, rel=1e-6) for key, value in logged.items())  # float32 there

    (run_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    rows = wandb_history(run_file)
    wandb = {(key, row["_step"]): value for row in rows for key, value in row.items() if not key.startswith("_")}
    assert wandb == logged


def test_trackers_are_validated_before_any_work(world, tmp_path, monkeypatch):  # noqa: F811
    result = runner.invoke(app, ["train", STAGE2, "--dry-run", "--set", "log.trackers=[tensorbored]"])
    one_line_error(result, "log.trackers")
    monkeypatch.setitem(__import__("pixart_cli.training.trackers").training.trackers._NEEDS, "wandb",
                        ("wandb_not_installed_here", "wandb"))  # fmt: skip
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", STAGE2, *stage2_args(world, run, steps=2), "--set", "log.trackers=[wandb]"])
    one_line_error(result, "log.trackers: wandb needs the wandb package", "pip install")
    assert not run.exists()
