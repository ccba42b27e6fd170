"""Where each command writes: the result on stdout (one JSON object with --json), progress, logs and errors on stderr.

So ``pixart eval-fid … > fid.txt`` keeps the FID and ``pixart sample … --json | jq`` reads the images written.
With this click version CliRunner keeps ``result.stdout`` and ``result.stderr`` apart (``result.output``: both).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pixart_cli.cli import app
from pixart_cli.models import DiT, PixArtConfig
from pixart_cli.tiny import make_tiny_pixart
from tests.checkpoints.test_convert import make_checkpoint
from tests.data.test_data import class_tree
from tests.evaluation.test_evaluation import _folder, _tiny_inception_file
from tests.utils import TINY_DIT, randomize

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()

# A 32-px PixArt through the tiny T5 and VAE: a few solver steps take well under a second on a CPU.
TINY_CONFIG = PixArtConfig(depth=1, hidden_size=32, num_heads=2, patch_size=2, input_size=4, caption_channels=32)


def invoke(*args: object):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def stdout_lines(result) -> list[str]:
    return result.stdout.strip().splitlines()


def as_json(result) -> dict:
    """The whole of stdout is one JSON object on one line."""
    assert result.stdout.count("\n") == 1, result.stdout
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tiny_t5, tiny_vae) -> Path:
    directory = tmp_path_factory.mktemp("model")
    return make_tiny_pixart(directory / "model", TINY_CONFIG, text_encoder=str(tiny_t5), vae=str(tiny_vae), seed=0)


@pytest.mark.parametrize(
    "command", ["eval-fid", "eval-compbench", "sample", "prepare", "train", "convert", "init-from-dit", "selfcheck"]
)
def test_every_command_with_a_result_takes_json(command):
    assert "--json" in invoke(command, "--help").stdout


def test_eval_fid_prints_the_fid_and_report_on_stdout(tmp_path):
    real, fake = _folder(tmp_path / "a", 10, seed=1), _folder(tmp_path / "b", 10, seed=2, noise=30.0)
    args = ["eval-fid", "--real", real, "--fake", fake, "--inception", _tiny_inception_file(tmp_path)]
    args += ["--size", "32", "--no-cache", "-o", tmp_path / "out"]
    result = invoke(*args)
    saved = json.loads((tmp_path / "out" / "fid_report.json").read_text())
    assert stdout_lines(result) == [
        f"FID {saved['fid']:.3f} (10 generated vs 10 real images, 32 px)",
        f"report: {tmp_path / 'out' / 'fid_report.json'}",
    ]
    assert "FID" not in result.stderr

    report = as_json(invoke(*args, "--json"))
    assert report["fid"] == pytest.approx(saved["fid"]) and report["clip_score"] is None
    assert report["real_images"] == report["fake_images"] == 10 and report["size"] == 32
    assert report["report"] == str(tmp_path / "out" / "fid_report.json")
    assert report["settings"]["benchmark"] == "folders"


def test_eval_compbench_prints_the_table_on_stdout_and_progress_on_stderr(tmp_path, tiny_model):
    args = ["eval-compbench", "--bench", "shapes", "--model", tiny_model, "--limit", "2", "--images-per-prompt", "1"]
    args += ["--steps", "2", "--device", "cpu", "-o", tmp_path / "out"]
    result = invoke(*args)
    lines = stdout_lines(result)
    assert "mean score per category" in lines[0] and any(line.startswith("│ spatial ") for line in lines)
    assert lines[-1].startswith(f"report: {tmp_path / 'out' / 'compbench_report.json'}")
    assert "generating images" in result.stderr and "generating" not in result.stdout

    report = as_json(invoke(*args, "--json"))  # resumed: the images are there, scored again
    assert report["benchmark"] == "shapes" and report["report"] == str(tmp_path / "out" / "compbench_report.json")
    color = report["categories"]["color"]
    assert {"mean", "extra", "images", "prompts", "evaluator"} <= color.keys() and color["images"] == 2
    assert set(report["categories"]) == {"color", "shape", "spatial", "complex"} and "one_object" in color["extra"]


def test_sample_prints_what_it_wrote_on_stdout(tmp_path, tiny_model):
    args = ["sample", "a red square", "-m", tiny_model, "-n", "2", "--steps", "2", "--device", "cpu"]
    result = invoke(*args, "-o", tmp_path / "a")
    assert stdout_lines(result) == [
        f"wrote 2 images (32×32) → {tmp_path / 'a'}",
        f"settings per image: {tmp_path / 'a' / 'manifest.jsonl'} (and in each PNG's text chunk)",
    ]
    assert "sampling" not in result.stdout

    report = as_json(invoke(*args, "-n", "3", "-o", tmp_path / "a", "--json"))  # one more per prompt
    assert len(report["written"]) == 1 and len(report["skipped"]) == 2
    assert all(Path(p).is_file() for p in report["written"] + report["skipped"])
    assert report["manifest"] == str(tmp_path / "a" / "manifest.jsonl") and report["grid"] is None
    assert (report["width"], report["height"]) == (32, 32) and report["output_dir"] == str(tmp_path / "a")


def test_prepare_prints_the_cache_on_stdout(tmp_path):
    args = ["prepare", class_tree(tmp_path / "classes"), "--vae", "none", "--resolution", "16", "--workers", "0"]
    args += ["--device", "cpu"]
    result = invoke(*args, "-o", tmp_path / "cache")
    (line,) = stdout_lines(result)
    assert line.startswith("cached 9 of 9 images in 1 shards → ") and str(tmp_path / "cache") in line

    report = as_json(invoke(*args, "-o", tmp_path / "again", "--json"))
    assert report["cache_dir"] == str(tmp_path / "again") and report["items"] == report["records"] == 9
    assert report["shards"] == 1 and report["bad_images"] == [] and report["buckets"][0]["items"] == 9


def test_train_prints_the_checkpoint_on_stdout(tmp_path):
    from pixart_cli.shapesworld.dataset import write_dataset

    data = write_dataset(tmp_path / "classes", 8, resolution=32, seed=1, fmt="imagefolder")
    tiny_dit = (
        "{depth: 1, hidden_size: 32, num_heads: 2, patch_size: 4, input_size: 32, in_channels: 3, num_classes: 48}"
    )
    sets = {
        "model.variant": "DiT-S/4", "model.config": tiny_dit, "model.init": "null", "data.vae": "none",
        "data.resolution": "32", "data.num_workers": "0", "data.cache": "null", "data.path": data,
        "train.mixed_precision": "fp32", "train.batch_size": "4", "train.steps": "2", "optim.warmup_steps": "0",
        "log.every": "1", "log.sample_every": "0", "cluster.nodes": "1", "cluster.gpus_per_node": "1",
    }  # fmt: skip
    args = ["train", ROOT / "recipes" / "stage1.yaml", *(a for k, v in sets.items() for a in ("--set", f"{k}={v}"))]
    result = invoke(*args, "--set", f"output.dir={tmp_path / 'run'}")
    done, where = stdout_lines(result)
    assert done.startswith("done: 2 steps, loss ") and where.startswith("checkpoint: ")
    assert str(tmp_path / "run" / "metrics.jsonl") in where and "precision" in result.stderr

    report = as_json(invoke(*args, "--set", f"output.dir={tmp_path / 'json'}", "--json"))
    last = json.loads((tmp_path / "json" / "metrics.jsonl").read_text().splitlines()[-1])
    assert report["steps"] == 2 and report["final_loss"] == pytest.approx(last["loss"])
    assert Path(report["checkpoint"]).is_dir() and report["metrics"] == str(tmp_path / "json" / "metrics.jsonl")
    assert report["unreadable_images"] == {} and report["missing_captions"] == 0


def test_train_dry_run_json_is_the_plan():
    recipe = ROOT / "recipes" / "stage2.yaml"
    plan = as_json(invoke("train", recipe, "--dry-run", "--json"))
    assert plan["recipe"] and plan["parameters"] == 610_856_096 and "pixart_cli train" in plan["launch"]
    assert isinstance(plan["missing"], list) and {"steps", "global_batch", "memory_gib", "time"} <= plan.keys()
    human = invoke("train", recipe, "--dry-run")  # as before: the table on stderr, the launch command on stdout
    assert human.stdout.strip() == plan["launch"] and "global batch" in human.stderr


def test_convert_prints_the_output_on_stdout(tmp_path):
    src, _ = make_checkpoint(tmp_path)
    result = invoke("convert", src, "-o", tmp_path / "official.pth", "--to", "official")
    assert stdout_lines(result) == [f"wrote official → {tmp_path / 'official.pth'}"]
    assert result.stderr.startswith("read pixart checkpoint")

    report = as_json(invoke("convert", src, "-o", tmp_path / "hf", "--to", "diffusers", "--json"))
    assert report["output"] == str(tmp_path / "hf") and report["format"] == "diffusers"
    assert report["source_format"] == "pixart" and report["source"] == str(src)


def test_init_from_dit_prints_the_output_on_stdout(tmp_path):
    torch.save(randomize(DiT(TINY_DIT)).state_dict(), tmp_path / "dit.pt")
    args = ["init-from-dit", tmp_path / "dit.pt", "--caption-channels", "16", "--max-length", "6", "--num-heads", "4"]
    result = invoke(*args, "-o", tmp_path / "px")
    (line,) = stdout_lines(result)
    assert line.startswith("PixArt depth 3, width 48") and line.endswith(f"→ {tmp_path / 'px'}")
    assert "CC-BY-NC" in result.stderr  # the licence note is a note, not the result

    report = as_json(invoke(*args, "-o", tmp_path / "px2", "--json"))
    assert report["output"] == str(tmp_path / "px2") and report["format"] == "pixart" and report["depth"] == 3


def test_selfcheck_prints_the_summary_on_stdout(monkeypatch):
    from pixart_cli.checkpoints import selfcheck

    # Stand-in checks: the real ones take seconds and are the library's business; here only the output matters.
    monkeypatch.setattr(selfcheck, "CHECKS", [("exact", lambda _: 0.0, 1e-5), ("close", lambda _: 1e-6, 1e-5)])
    result = invoke("selfcheck")
    assert stdout_lines(result) == ["all 2 checks passed"] and "ok  exact" in result.stderr
    report = as_json(invoke("selfcheck", "--json"))
    assert report["ok"] is True and [c["name"] for c in report["checks"]] == ["exact", "close"]

    monkeypatch.setattr(selfcheck, "CHECKS", [("exact", lambda _: 0.0, 1e-5), ("off", lambda _: 1.0, 1e-5)])
    result = runner.invoke(app, ["selfcheck", "--json"])
    report = json.loads(result.stdout)
    assert result.exit_code == 1 and report["ok"] is False and [c["ok"] for c in report["checks"]] == [True, False]
    result = runner.invoke(app, ["selfcheck"])
    assert result.exit_code == 1 and result.stdout.strip() == "1 of 2 checks FAILED: off"


def test_errors_leave_stdout_empty_even_with_json(tmp_path):
    result = runner.invoke(app, ["eval-fid", "--real", str(tmp_path), "--json"])
    assert result.exit_code == 2 and result.stdout == "" and result.stderr.startswith("error: pass --coco SPLIT")
    result = runner.invoke(app, ["prepare", str(tmp_path / "nowhere"), "--json"])
    assert result.exit_code == 2 and result.stdout == "" and "no such dataset" in result.stderr
