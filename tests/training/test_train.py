"""`pixart train`: recipes, the tiny end-to-end run, resume, data parallelism, the stage chain, bad input."""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from pixart_cli.checkpoints.format import checkpoint_dirs, load_checkpoint
from pixart_cli.cli import app
from pixart_cli.io import LOCK_FILE
from pixart_cli.training.recipe import load_recipe
from tests.utils import launch_report, run_launcher

ROOT = Path(__file__).resolve().parents[2]
# Training recipes; recipes/caption/ holds `pixart caption --config` settings (tests/captioning).
RECIPES = sorted(
    p for p in (ROOT / "recipes").rglob("*.yaml") if "caption" not in p.relative_to(ROOT / "recipes").parts
)
runner = CliRunner()

# A tiny PixArt in pixel space on 32×32 ShapesWorld scenes: a few seconds per 50 steps on a CPU.
TINY_MODEL = (
    "{depth: 2, hidden_size: 96, num_heads: 4, patch_size: 4, input_size: 32, in_channels: 3, "
    "caption_channels: 32, max_length: 32}"
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """ShapesWorld data in both formats, a tiny T5 trained on its captions, and a prepared feature cache."""
    from pixart_cli.data.cache import PrepareSettings, prepare
    from pixart_cli.shapesworld.dataset import write_dataset
    from pixart_cli.shapesworld.prompts import caption
    from pixart_cli.shapesworld.world import sample_scene
    from pixart_cli.tiny import make_tiny_t5

    root = tmp_path_factory.mktemp("world")
    sentences = [caption(sample_scene(i), "dense", seed=i) for i in range(500)]
    make_tiny_t5(root / "t5", sentences, d_model=32)
    write_dataset(root / "captions", 96, resolution=32, seed=0, fmt="jsonl")
    write_dataset(root / "classes", 96, resolution=32, seed=1, fmt="imagefolder")
    prepare(
        root / "captions" / "manifest.jsonl",
        root / "cache",
        PrepareSettings(resolution=32, max_length=32),
        t5=str(root / "t5"),
        vae="none",
    )
    return root


def stage2_args(world: Path, out: Path, steps: int = 50, batch: int = 16) -> list[str]:
    return [
        "--set", "model.variant=PixArt-S/2", "--set", f"model.config={TINY_MODEL}", "--set", "model.init=null",
        "--set", "model.gradient_checkpointing=false",
        "--set", f"data.path={world / 'captions' / 'manifest.jsonl'}", "--set", f"data.cache={world / 'cache'}",
        "--set", "data.resolution=32", "--set", f"data.text_encoder={world / 't5'}", "--set", "data.vae=none",
        "--set", "data.num_workers=0",
        "--set", "optim.lr=5e-4", "--set", "optim.grad_clip=1.0", "--set", "optim.warmup_steps=5",
        "--set", "optim.lr_scaling=none",
        "--set", f"train.steps={steps}", "--set", f"train.batch_size={batch}", "--set", "train.mixed_precision=fp32",
        "--set", "train.ema_decay=0.9", "--set", f"output.dir={out}", "--set", "output.save_every=25",
        "--set", "log.every=5", "--set", "log.sample_every=0",
        "--set", "cluster.nodes=1", "--set", "cluster.gpus_per_node=1",
    ]  # fmt: skip


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_every_shipped_recipe_loads_and_dry_runs(recipe):
    load_recipe(recipe)
    result = runner.invoke(app, ["train", str(recipe), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "global batch" in result.output and "pixart_cli train" in result.output


def test_xl_recipes_have_the_paper_model():
    recipe, _ = load_recipe(ROOT / "recipes" / "stage2.yaml")
    result = runner.invoke(app, ["train", str(ROOT / "recipes" / "stage2.yaml"), "--dry-run"])
    assert "610,856,096" in result.output
    assert recipe.global_batch() == 176 * 64
    result = runner.invoke(app, ["train", str(ROOT / "recipes" / "stage3.yaml"), "--dry-run"])
    assert "611,349,152" in result.output


def test_tiny_end_to_end_loss_goes_down_and_the_checkpoint_samples(world, tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", str(ROOT / "recipes" / "stage2.yaml"), *stage2_args(world, run)])
    assert result.exit_code == 0, result.output
    history = losses(run)
    assert len(history) == 10 and history[-1] < 0.6 * history[0], history
    assert (run / "loss.png").is_file()
    assert [step for step, _ in checkpoint_dirs(run)] == [25, 50]
    ckpt = load_checkpoint(run / "checkpoints" / "step-0000050")
    assert ckpt.ema_state_dict is not None and ckpt.meta.vae == "none"
    result = runner.invoke(
        app, ["sample", "a red circle", "-n", "2", "--model", str(run), "--steps", "5", "-o", str(tmp_path / "samples")]
    )
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "samples").glob("*.png"))) == 2


def test_resume_auto_continues_exactly(world, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    assert (
        runner.invoke(app, ["train", str(ROOT / "recipes" / "stage2.yaml"), *stage2_args(world, full)]).exit_code == 0
    )
    args = stage2_args(world, split)
    assert (
        runner.invoke(app, ["train", str(ROOT / "recipes" / "stage2.yaml"), *args, "--set", "train.steps=25"]).exit_code
        == 0
    )
    result = runner.invoke(app, ["train", str(ROOT / "recipes" / "stage2.yaml"), *args, "--resume", "auto"])
    assert result.exit_code == 0, result.output
    for name in ("model", "ema"):
        a = load_file(full / "checkpoints" / "step-0000050" / f"{name}.safetensors")
        b = load_file(split / "checkpoints" / "step-0000050" / f"{name}.safetensors")
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert losses(full) == pytest.approx(losses(split), abs=1e-6)


def test_two_processes_match_one_process_with_the_same_global_batch(world, tmp_path):
    """gloo data parallelism on the CPU: ranks agree (checked at each save) and equal a single process."""
    recipe = str(ROOT / "recipes" / "stage2.yaml")
    one = runner.invoke(app, ["train", recipe, *stage2_args(world, tmp_path / "one", steps=6, batch=16)])
    assert one.exit_code == 0, one.output
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port: the default 29500 may be taken by anything else on the host
        "--nproc_per_node=2",
        "-m",
        "pixart_cli",
        "train",
        recipe,
        *stage2_args(world, tmp_path / "two", steps=6, batch=8),
    ]
    done = run_launcher(cmd, timeout=180, cwd=tmp_path)
    assert done.returncode == 0, launch_report(done)
    assert len(list((tmp_path / "two" / "checkpoints").iterdir())) == 1  # one checkpoint, written once
    for name in ("model", "ema"):
        a = load_file(tmp_path / "one" / "checkpoints" / "step-0000006" / f"{name}.safetensors")
        b = load_file(tmp_path / "two" / "checkpoints" / "step-0000006" / f"{name}.safetensors")
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


def test_stage_chain_runs_at_tiny_size(world, tmp_path):
    """stage 1 (class-conditional DiT) → init-from-dit → stage 2 → stage 3 (multi-scale), from the shipped recipes."""
    tiny_dit = (
        "{depth: 2, hidden_size: 96, num_heads: 4, patch_size: 4, input_size: 32, in_channels: 3, num_classes: 48}"
    )
    common = [
        "--set",
        "data.vae=none",
        "--set",
        "data.resolution=32",
        "--set",
        "data.num_workers=0",
        "--set",
        "train.mixed_precision=fp32",
        "--set",
        "train.batch_size=8",
        "--set",
        "train.steps=4",
        "--set",
        "optim.warmup_steps=0",
        "--set",
        "log.every=2",
        "--set",
        "log.sample_every=0",
        "--set",
        "cluster.nodes=1",
        "--set",
        "cluster.gpus_per_node=1",
        "--set",
        "data.cache=null",
    ]
    stage1 = runner.invoke(
        app,
        [
            "train",
            str(ROOT / "recipes" / "stage1.yaml"),
            *common,
            "--set",
            "model.variant=DiT-S/4",
            "--set",
            f"model.config={tiny_dit}",
            "--set",
            "model.init=null",
            "--set",
            f"data.path={world / 'classes'}",
            "--set",
            f"output.dir={tmp_path / 's1'}",
        ],
    )
    assert stage1.exit_code == 0, stage1.output
    init = runner.invoke(
        app,
        [
            "init-from-dit",
            str(tmp_path / "s1"),
            "-o",
            str(tmp_path / "s1-pixart"),
            "--caption-channels",
            "32",
            "--max-length",
            "32",
            "--num-heads",
            "4",
        ],
    )
    assert init.exit_code == 0, init.output
    stage2_model = TINY_MODEL
    text = ["--set", f"data.text_encoder={world / 't5'}", "--set", f"data.path={world / 'captions' / 'manifest.jsonl'}"]
    stage2 = runner.invoke(
        app,
        [
            "train",
            str(ROOT / "recipes" / "stage2.yaml"),
            *common,
            *text,
            "--set",
            "model.variant=PixArt-S/4",
            "--set",
            f"model.config={stage2_model}",
            "--set",
            f"model.init={tmp_path / 's1-pixart'}",
            "--set",
            f"output.dir={tmp_path / 's2'}",
        ],
    )
    assert stage2.exit_code == 0, stage2.output
    stage3_model = TINY_MODEL[:-1] + ", multi_scale: true, interpolation_scale: 1.0}"
    stage3 = runner.invoke(
        app,
        [
            "train",
            str(ROOT / "recipes" / "stage3.yaml"),
            *common,
            *text,
            "--set",
            "data.multi_scale=true",
            "--set",
            "model.variant=PixArt-S/4",
            "--set",
            f"model.config={stage3_model}",
            "--set",
            f"model.init={tmp_path / 's2'}",
            "--set",
            f"output.dir={tmp_path / 's3'}",
        ],
    )
    assert stage3.exit_code == 0, stage3.output
    final = load_checkpoint(tmp_path / "s3" / "checkpoints" / "step-0000004")
    assert final.config.multi_scale and "csize_embedder.mlp.0.weight" in final.state_dict


def test_shapes_recipes_chain_on_a_fresh_machine(tmp_path):
    """recipes/shapes: stage 1 DiT → stage 2 straight from the DiT run (re-parameterised on the fly) → stage 3
    multi-aspect, each generating its scenes on first use; only sizes are shrunk."""

    def train(stage: str, model: str, *extra: str) -> None:
        args = ["train", str(ROOT / "recipes" / "shapes" / f"stage{stage}.yaml")]
        for item in (
            f"model.config={model}", "data.shapes.n=48", "data.cache=null", "train.batch_size=8", "train.steps=3",
            "train.mixed_precision=fp32", "optim.warmup_steps=0", "log.every=1",
            f"data.path={tmp_path / f'data{stage}'}" + ("" if stage == "1" else "/manifest.jsonl"),
            f"output.dir={tmp_path / f's{stage}'}", "validation.shapes.n=16",
            f"validation.path={tmp_path / f'val{stage}'}" + ("" if stage == "1" else "/manifest.jsonl"), *extra,
        ):  # fmt: skip
            args += ["--set", item]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output

    dims = "depth: 2, hidden_size: 48, num_heads: 2, patch_size: 4, in_channels: 3"
    train("1", f"{{{dims}, input_size: 32, num_classes: 48}}")
    pixart = f"{dims}, caption_channels: 64, max_length: 64"
    train("2", f"{{{pixart}, input_size: 32}}", f"model.init={tmp_path / 's1'}")
    train("3", f"{{{pixart}, input_size: 64, interpolation_scale: 2.0}}", f"model.init={tmp_path / 's2'}")
    final = load_checkpoint(tmp_path / "s3" / "checkpoints" / "step-0000003")
    assert final.config.multi_scale and final.config.input_size == 64
    assert final.meta.prompt_completion == "shapesworld"  # samples complete prompts, as the demo does
    assert load_checkpoint(tmp_path / "s1" / "checkpoints" / "step-0000003").meta.prompt_completion is None
    sizes = {(r["width"], r["height"]) for r in map(json.loads, (tmp_path / "data3" / "manifest.jsonl").open())}
    assert len(sizes) > 1
    for stage in "123":  # each measured its held-out loss at the end, on scenes it generated
        assert [json.loads(line)["step"] for line in (tmp_path / f"s{stage}" / "validation.jsonl").open()] == [3]


# -- bad input ----------------------------------------------------------------------------------------------------


def one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error:") and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def test_recipe_errors_name_the_key(tmp_path):
    stage2 = str(ROOT / "recipes" / "stage2.yaml")
    one_line_error(runner.invoke(app, ["train", stage2, "--dry-run", "--set", "optim.lrr=1"]), "optim.lrr", "unknown")
    one_line_error(runner.invoke(app, ["train", stage2, "--dry-run", "--set", "train.steps=many"]), "train.steps")
    one_line_error(
        runner.invoke(app, ["train", stage2, "--dry-run", "--set", "optim.lr=-1"]), "optim.lr: must be positive"
    )
    one_line_error(
        runner.invoke(app, ["train", stage2, "--dry-run", "--set", "model.config={depth: x}"]), "model.config.depth"
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstage: 2\nmodel: [unclosed\n")
    one_line_error(runner.invoke(app, ["train", str(bad), "--dry-run"]), "invalid YAML", "line")
    one_line_error(runner.invoke(app, ["train", str(tmp_path / "absent.yaml")]), "no such recipe")


def test_missing_data_and_unwritable_output(world, tmp_path):
    stage2 = str(ROOT / "recipes" / "stage2.yaml")
    args = stage2_args(world, tmp_path / "run")
    result = runner.invoke(
        app, ["train", stage2, *args, "--set", "data.cache=null", "--set", f"data.path={tmp_path / 'nothing'}"]
    )
    one_line_error(result, "nothing")
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = runner.invoke(app, ["train", stage2, *args, "--set", f"output.dir={blocker / 'run'}"])
    one_line_error(result, "output.dir")
    shapes = str(ROOT / "recipes" / "shapes" / "stage3.yaml")
    data = tmp_path / "scenes"
    result = runner.invoke(
        app,
        ["train", shapes, "--set", "data.shapes.resolution=[]", "--set", f"data.path={data / 'manifest.jsonl'}",
         "--set", f"output.dir={tmp_path / 's3'}", "--set", "model.init=null", "--set", "train.mixed_precision=fp32"],
    )  # fmt: skip
    one_line_error(result, "data.shapes.resolution: an empty list of sizes")
    assert not data.exists()


def test_a_cache_of_another_encoders_features_is_refused(world, tmp_path):
    """Features are what the model learns to read: a cache encoded by another T5 (or VAE) than the recipe names
    would train it on the wrong inputs without a sound. The same encoder under another name is accepted."""
    import shutil

    from pixart_cli.components.resolve import ASSETS
    from pixart_cli.data.cache import same_component
    from pixart_cli.models import PixArtConfig
    from pixart_cli.tiny import make_tiny_pixart

    other = shutil.copytree(world / "t5", tmp_path / "t5-other")
    args = stage2_args(world, tmp_path / "run", steps=1)
    result = runner.invoke(
        app, ["train", str(ROOT / "recipes" / "stage2.yaml"), *args, "--set", f"data.text_encoder={other}"]
    )
    one_line_error(result, "data.cache", "encoded by", "data.text_encoder")
    result = runner.invoke(app, ["train", str(ROOT / "recipes" / "stage2.yaml"), *args, "--set", "data.vae=sd-vae"])
    one_line_error(result, "data.cache", "data.vae")
    # A model that read another encoder may start here (switching encoders is allowed), but the log says so.
    config = PixArtConfig(**yaml.safe_load(TINY_MODEL))
    init = make_tiny_pixart(tmp_path / "init", config, text_encoder="builtin:shapes-t5")
    result = runner.invoke(app, ["train", str(ROOT / "recipes" / "stage2.yaml"), *args, "--set", f"model.init={init}"])
    assert result.exit_code == 0, result.output
    assert "learned to read builtin:shapes-t5's features" in " ".join(result.output.split()), result.output
    assert same_component("builtin:shapes-t5", str(ASSETS / "shapes-t5"))
    assert not same_component("builtin:shapes-t5", "builtin:shapes-t5-roles")
    assert same_component(str(world / "t5"), str(world / "t5" / ".." / "t5")) and same_component(None, "x")


def test_every_rank_may_check_the_output_dir_at_once(tmp_path):
    """Each rank of a launch proves the output directory writable at the same moment (CI once lost this race)."""
    from concurrent.futures import ThreadPoolExecutor

    from pixart_cli.training.loop import ensure_output_dir

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: ensure_output_dir(tmp_path / "run"), range(400)))
    assert list((tmp_path / "run").iterdir()) == []


def test_a_bad_shapes_section_is_one_error_naming_the_key_even_when_the_data_exists(tmp_path):
    """data.shapes is checked when the recipe loads: a typo no longer passes because the scenes were made already."""
    data = tmp_path / "scenes"
    data.mkdir()
    (data / "manifest.jsonl").write_text("")
    quick = str(ROOT / "recipes" / "shapes" / "quick.yaml")
    base = [quick, "--set", f"data.path={data / 'manifest.jsonl'}", "--set", f"output.dir={tmp_path / 'run'}"]
    for extra, message in (
        ("data.shapes.caption_styl=sparse", "data.shapes.caption_styl: unknown key (expected one of: n, resolution,"),
        ("data.shapes.caption_style=spares", "data.shapes.caption_style: must be one of 'dense'"),
        ("data.shapes.objects=4", "data.shapes: objects must be between 1 and 3"),
        ("data.shapes.resolution=[[64, 64], [80]]", "data.shapes.resolution: list [[64, 64], [80]] matches no"),
    ):
        for dry_run in (["--dry-run"], []):
            one_line_error(runner.invoke(app, ["train", *base, "--set", extra, *dry_run]), message)
    assert [f.name for f in data.iterdir()] == ["manifest.jsonl"] and not (tmp_path / "run").exists()


def test_the_shapes_section_is_typed_and_saved_as_the_plain_mapping_it_was():
    """recipe.yaml keeps data.shapes a plain YAML mapping (sizes as lists); a run saved while it was an untyped
    mapping (only the keys the recipe gave) resumes without the filled-in defaults counting as changes."""
    from pixart_cli.training.recipe import ShapesSection, resume_changes

    for name in ("quick", "stage1", "stage3"):
        path = ROOT / "recipes" / "shapes" / f"{name}.yaml"
        recipe, resolved = load_recipe(path)
        given = yaml.safe_load(path.read_text())["data"]["shapes"]
        assert isinstance(recipe.data.shapes, ShapesSection)
        saved = resolved["data"]["shapes"]
        assert {k: saved[k] for k in given} == given and saved.keys() >= {"objects", "caption_style", "workers"}
        assert yaml.safe_load(yaml.safe_dump(resolved)) == resolved  # no tuples: safe_dump writes it
        before = {**resolved, "data": {**resolved["data"], "shapes": given}}  # recipe.yaml of an earlier version
        assert resume_changes(before, resolved) == ([], [])
    recipe, resolved = load_recipe(ROOT / "recipes" / "shapes" / "stage3.yaml")
    assert recipe.data.shapes.resolution[1] == (80, 48) and resolved["data"]["shapes"]["resolution"][1] == [80, 48]
    _, changed = load_recipe(ROOT / "recipes" / "shapes" / "stage3.yaml", ["data.shapes.seed=5"])
    assert resume_changes(resolved, changed)[0] == ["data.shapes.seed: 2 → 5"]


def test_checkpoints_of_shapesworld_captions_record_prompt_completion():
    """A PixArt trained on generated ShapesWorld data (data.shapes) completes prompts like the demo; the class-
    conditional DiT and real-data recipes record none."""
    shapes = ROOT / "recipes" / "shapes"
    for name in ("quick", "stage2", "stage3", "demo-prompts"):
        assert load_recipe(shapes / f"{name}.yaml")[0].prompt_completion() == "shapesworld", name
    assert load_recipe(shapes / "stage1.yaml")[0].prompt_completion() is None
    assert load_recipe(ROOT / "recipes" / "stage2.yaml")[0].prompt_completion() is None
    assert load_recipe(shapes / "stage2.yaml", ["data.shapes=null"])[0].prompt_completion() is None


def test_only_the_main_process_generates_a_missing_shapes_dataset(tmp_path):
    """Other ranks wait at the barrier and then read what the main process wrote (here: nothing, so they fail)."""
    from types import SimpleNamespace

    from pixart_cli.errors import PixartError
    from pixart_cli.training.batches import batch_source

    data = tmp_path / "scenes"
    recipe, _ = load_recipe(
        ROOT / "recipes" / "shapes" / "stage2.yaml",
        (f"data.path={data / 'manifest.jsonl'}", "data.cache=null", "data.shapes.n=8"),
    )
    barrier = []
    other_rank = SimpleNamespace(is_main_process=False, wait_for_everyone=lambda: barrier.append(True))
    with pytest.raises(PixartError, match="no such dataset"):
        batch_source(recipe, other_rank)
    assert barrier == [True] and not data.exists()


def test_nan_loss_stops_with_the_last_checkpoint_intact(world, tmp_path):
    from pixart_cli.training.batches import batch_source
    from pixart_cli.training.loop import TrainingDiverged, train
    from pixart_cli.training.recipe import load_recipe as load

    recipe, resolved = load(ROOT / "recipes" / "stage2.yaml", _pairs(stage2_args(world, tmp_path / "run", steps=40)))

    class Poisoned:
        """The real batches, with NaN inputs from step 30 on."""

        def __init__(self, inner):
            self.inner = inner

        def iterate(self, epoch, start, device):
            for i, (e, b, batch) in enumerate(self.inner.iterate(epoch, start, device)):
                if i >= 29:
                    batch["x0"] = torch.full_like(batch["x0"], float("nan"))
                yield e, b, batch

    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    with pytest.raises(TrainingDiverged, match=r"step 30.*step-0000025"):
        train(recipe, resolved, Poisoned(batch_source(recipe, accelerator)), accelerator=accelerator)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "step-0000025")
    assert all(torch.isfinite(v).all() for v in ckpt.state_dict.values())
    assert [s for s, _ in checkpoint_dirs(tmp_path / "run")] == [25]


def _pairs(args: list[str]) -> list[str]:
    return [value for flag, value in zip(args[::2], args[1::2], strict=True) if flag == "--set"]


def test_resolved_recipe_is_saved_with_each_checkpoint(world, tmp_path):
    run = tmp_path / "run"
    assert (
        runner.invoke(
            app, ["train", str(ROOT / "recipes" / "stage2.yaml"), *stage2_args(world, run, steps=5)]
        ).exit_code
        == 0
    )
    saved = yaml.safe_load((run / "checkpoints" / "step-0000005" / "recipe.yaml").read_text())
    assert saved["train"]["steps"] == 5 and saved["model"]["init"] is None


def test_ema_warmup_forgets_the_initial_weights():
    from pixart_cli.training.ema import EMA

    model = torch.nn.Linear(2, 2)
    ema = EMA(model, 0.9999, warmup=True)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(10**7) == 0.9999
    with torch.no_grad():
        model.weight.fill_(1.0)
    for n in range(1000):
        ema.update(model, n)
    init_share = 1.0
    for n in range(1000):
        init_share *= ema.decay_at(n)
    assert init_share < 1e-3  # without warm-up it would be 0.9999^1000 ≈ 0.90
    assert torch.allclose(ema.params[0], torch.ones(2, 2), atol=0.01)
    assert EMA(model, 0.9999, warmup=False).decay_at(0) == 0.9999


@pytest.mark.slow  # ~30–55 s on a 2-core CPU: runs in CI with -m slow
def test_compiled_blocks_train_and_save_plain_checkpoints(world, tmp_path, monkeypatch):
    # A cache of its own: inductor's shared cache keys its CPU kernels without the ATen capability, so kernels built
    # under ATEN_CPU_CAPABILITY=avx2 and run at AVX512 crashed the process (2026-12-07, torch 2.13).
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-cache"))
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", str(ROOT / "recipes" / "stage2.yaml"), *stage2_args(world, run, steps=2),
                                 "--set", "model.compile=true"])  # fmt: skip
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(run / "checkpoints" / "step-0000002")  # strict: no "_orig_mod." keys
    assert "blocks.0.attn.qkv.weight" in ckpt.state_dict


def test_caption_init_xavier_applies_only_to_a_fresh_caption_projection(tmp_path):
    """model.caption_init: official N(0, 0.02) or xavier, from scratch and from a DiT; a PixArt
    checkpoint's own projection is kept whatever the setting."""
    from pixart_cli.checkpoints.format import Checkpoint, CheckpointMeta, build_model, save_checkpoint
    from pixart_cli.training.setup import build_training_model

    shapes = ROOT / "recipes" / "shapes" / "stage2.yaml"
    tiny = f"model.config={TINY_MODEL}"

    def fc1_std(*sets: str) -> float:
        recipe, _ = load_recipe(shapes, [tiny, *sets])
        model = build_training_model(recipe).model
        return model.y_embedder.y_proj.fc1.weight.std().item()

    assert fc1_std("model.init=null", "model.caption_init=official") == pytest.approx(0.02, rel=0.1)
    xavier = (6 / (32 + 96)) ** 0.5 / 3**0.5  # std of xavier-uniform for 32 → 96
    assert fc1_std("model.init=null", "model.caption_init=xavier") == pytest.approx(xavier, rel=0.1)
    recipe, _ = load_recipe(shapes, ["model.caption_init=xavier"])  # from the shipped DiT (6 × 240, T5 width 64)
    from_dit = build_training_model(recipe).model
    assert from_dit.y_embedder.y_proj.fc1.weight.std().item() == pytest.approx((2 / (64 + 240)) ** 0.5, rel=0.1)
    recipe, _ = load_recipe(shapes, [tiny])
    pixart = build_model(recipe.model_config())
    with torch.no_grad():
        pixart.y_embedder.y_proj.fc1.weight.fill_(0.5)
    save_checkpoint(Checkpoint(recipe.model_config(), pixart.state_dict(), None, CheckpointMeta()), tmp_path / "p")
    assert fc1_std(f"model.init={tmp_path / 'p'}", "model.caption_init=xavier") == 0.0  # all 0.5: kept


def test_lr_schedule_warms_up_then_decays_to_the_final_fraction():
    from pixart_cli.training.loop import lr_multiplier
    from pixart_cli.training.recipe import OptimSection

    constant = lr_multiplier(OptimSection(warmup_steps=4), total_steps=20)
    assert [constant(s) for s in (0, 3, 4, 19, 100)] == [0.25, 1.0, 1.0, 1.0, 1.0]
    for decay in ("cosine", "linear"):
        f = lr_multiplier(OptimSection(warmup_steps=4, decay=decay, final_lr_fraction=0.1), total_steps=104)
        values = [f(s) for s in range(104)]
        assert values[3] == 1.0 and values[4] == 1.0
        assert all(a >= b for a, b in itertools.pairwise(values[4:]))  # never rises after warm-up
        assert values[54] == pytest.approx(0.55) and f(104) == pytest.approx(0.1) and f(10**6) == pytest.approx(0.1)
    no_warmup = lr_multiplier(OptimSection(warmup_steps=0, decay="linear"), total_steps=10)
    assert no_warmup(0) == 1.0 and no_warmup(5) == pytest.approx(0.5)


def test_timestep_sampling_uniform_keeps_its_stream_and_logit_normal_favours_the_middle():
    from pixart_cli.diffusion import GaussianDiffusion

    diffusion = GaussianDiffusion(1000)
    uniform = diffusion.sample_timesteps(4096, torch.Generator().manual_seed(3))
    assert torch.equal(uniform, torch.randint(0, 1000, (4096,), generator=torch.Generator().manual_seed(3)))
    t = diffusion.sample_timesteps(100_000, torch.Generator().manual_seed(0), "logit-normal")
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) <= 999
    assert abs(t.float().mean().item() - 500) < 5
    assert ((t >= 200) & (t < 800)).float().mean().item() == pytest.approx(0.83, abs=0.01)  # uniform: 0.60
    late = diffusion.sample_timesteps(10_000, torch.Generator().manual_seed(0), "logit-normal", mean=1.0)
    assert late.float().mean().item() > 600


def test_schedule_and_timestep_options_are_validated_and_train(world, tmp_path):
    stage2 = str(ROOT / "recipes" / "stage2.yaml")
    one_line_error(
        runner.invoke(app, ["train", stage2, "--dry-run", "--set", "optim.decay=exponential"]), "optim.decay"
    )
    one_line_error(
        runner.invoke(app, ["train", stage2, "--dry-run", "--set", "optim.final_lr_fraction=2"]), "final_lr_fraction"
    )
    one_line_error(runner.invoke(app, ["train", stage2, "--dry-run", "--set", "train.timestep_std=0"]), "timestep_std")
    dry = runner.invoke(
        app, ["train", stage2, "--dry-run", "--set", "optim.decay=cosine", "--set", "train.timesteps=logit-normal"]
    )
    assert "cosine decay" in dry.output and "logit-normal(0, 1)" in dry.output
    run = tmp_path / "run"
    options = ["--set", "optim.decay=linear", "--set", "optim.warmup_steps=0", "--set", "train.timesteps=logit-normal"]
    options += ["--set", "log.every=1"]
    result = runner.invoke(app, ["train", stage2, *stage2_args(world, run, steps=6), *options])
    assert result.exit_code == 0, result.output
    lrs = [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"lr"' in line]
    assert len(lrs) == 6 and lrs[-1] < lrs[0]


def test_v_prediction_trains_is_recorded_and_is_inherited_from_model_init(world, tmp_path):
    """model.config.prediction_type=v_prediction trains and is saved; a run from that checkpoint keeps predicting v
    unless its recipe names a prediction type (then it switches, and says so)."""
    from pixart_cli.training.setup import build_training_model

    stage2 = str(ROOT / "recipes" / "stage2.yaml")
    v_config = TINY_MODEL.rstrip("}") + ", prediction_type: v_prediction}"
    one_line_error(
        runner.invoke(app, ["train", stage2, "--dry-run", "--set", "model.config={prediction_type: v}"]),
        "model.config.prediction_type",
    )
    dry = runner.invoke(app, ["train", stage2, "--dry-run", "--set", f"model.config={v_config}"])
    assert "predicts v_prediction" in dry.output
    run = tmp_path / "v"
    args = [*stage2_args(world, run, steps=6), "--set", f"model.config={v_config}"]
    result = runner.invoke(app, ["train", stage2, *args])
    assert result.exit_code == 0, result.output
    assert all(math.isfinite(loss) for loss in losses(run))
    checkpoint = run / "checkpoints" / "step-0000006"
    assert load_checkpoint(checkpoint).config.prediction_type == "v_prediction"
    inherit = [*_pairs(stage2_args(world, tmp_path / "next")), f"model.init={checkpoint}"]
    recipe, _ = load_recipe(stage2, inherit)
    model, description, _ = build_training_model(recipe)
    assert model.config.prediction_type == "v_prediction" and "predicts v_prediction" in description
    recipe, _ = load_recipe(stage2, [*inherit, f"model.config={TINY_MODEL.rstrip('}')}, prediction_type: epsilon}}"])
    model, description, _ = build_training_model(recipe)
    assert model.config.prediction_type == "epsilon" and "switching from v_prediction to epsilon" in description


# -- what a newcomer meets first: precision, a used folder, stops, the bar, the dry run ----------------------------


@pytest.mark.parametrize(
    ("requested", "native", "capability", "expected", "warns"),
    [
        ("auto", True, "AVX512", "bf16", False),
        ("auto", False, "AVX2", "fp32", False),
        ("bf16", False, "AVX2", "bf16", True),
        ("bf16", True, "AVX512", "bf16", False),
        ("fp32", False, "AVX2", "fp32", False),
    ],
)
def test_auto_precision_takes_bf16_only_where_the_cpu_computes_it(monkeypatch, requested, native, capability,
                                                                   expected, warns):  # fmt: skip
    from pixart_cli import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(precision, "cpu_capability", lambda: capability)
    choice = precision.choose_precision(requested, "cpu")
    assert choice.precision == expected and (choice.warning is not None) == warns
    assert capability in choice.describe()
    if warns:
        assert "slower than fp32" in choice.warning and "auto" in choice.warning


def test_native_bf16_follows_the_kernel_level_torch_uses():
    """A CPU with AVX-512 BF16 forced down to AVX2 kernels (ATEN_CPU_CAPABILITY=avx2) emulates bf16: auto is fp32."""
    code = "from pixart_cli.precision import choose_precision as c; print(c('auto', 'cpu').precision)"
    import subprocess

    env = {**__import__("os").environ, "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "fp32"


def test_train_logs_the_precision_it_chose(world, tmp_path):
    from accelerate.state import AcceleratorState

    args = stage2_args(world, tmp_path / "run", steps=2, batch=4)
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        result = runner.invoke(app, ["train", str(ROOT / "recipes" / "stage2.yaml"), *args, "--set",
                                     "train.mixed_precision=auto", "--set", "log.every=1"])  # fmt: skip
    finally:  # accelerate keeps one precision per process; the other tests train in fp32
        AcceleratorState._reset_state(reset_partial_state=True)
    assert result.exit_code == 0, result.output
    assert "precision: " in result.output and "(auto: this CPU: " in result.output


def test_a_folder_with_checkpoints_is_refused_without_resume(world, tmp_path):
    run = tmp_path / "run"
    args = ["train", str(ROOT / "recipes" / "stage2.yaml"), *stage2_args(world, run, steps=2, batch=4)]
    assert runner.invoke(app, args).exit_code == 0
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "already holds checkpoints" in result.output and "--resume auto" in result.output
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    assert runner.invoke(app, [*args, "--resume", "auto"]).exit_code == 0  # resuming (here: nothing left) is fine


def test_done_line_reports_the_last_logged_loss(world, tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", str(ROOT / "recipes" / "stage2.yaml"),
                                 *stage2_args(world, run, steps=12, batch=4)])  # fmt: skip
    assert result.exit_code == 0, result.output
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"loss {last['loss']:.4f} (the last logged value)" in result.output


def test_the_bar_moves_every_step_and_prints_lines_off_a_terminal(world, tmp_path):
    """On_step is called at the start and after every step; off a terminal the bar prints plain lines with an ETA."""
    from pixart_cli.training.batches import batch_source
    from pixart_cli.training.loop import make_accelerator, train

    recipe, resolved = load_recipe(
        ROOT / "recipes" / "stage2.yaml",
        [a for a in stage2_args(world, tmp_path / "run", steps=6, batch=4) if a != "--set"],
    )
    accelerator, _ = make_accelerator(recipe)
    seen: list[int] = []
    train(recipe, resolved, batch_source(recipe, accelerator), on_step=seen.append, accelerator=accelerator)
    assert seen == list(range(7))

    import io

    from rich.console import Console

    from pixart_cli.cli.progress import Bar

    log = io.StringIO()
    with Bar(console=Console(file=log), interval=3600) as bar:  # off a terminal: the first update, then the last
        task = bar.add_task("encoding", total=4, info="")
        for done in range(1, 5):
            bar.update(task, completed=done, info=f"shard {done}/4")
    lines = [line for line in log.getvalue().splitlines() if re.match(r"encoding \d", line)]
    assert lines[0].startswith("encoding 1/4 (25%)") and "ETA" in lines[0] and lines[0].endswith("shard 1/4")
    assert lines[1].startswith("encoding 4/4 (100%)") and len(lines) == 2
    result = runner.invoke(app, ["train", str(ROOT / "recipes" / "stage2.yaml"),
                                 *stage2_args(world, tmp_path / "cli", steps=3, batch=4)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "train 3/3 (100%)" in result.output


def test_dry_run_speaks_of_processes_on_a_cpu_estimates_time_and_flags_missing_inputs(tmp_path):
    result = runner.invoke(app, ["train", str(ROOT / "recipes" / "shapes" / "stage3.yaml"), "--dry-run",
                                 "--set", f"model.init={tmp_path / 'nowhere'}",
                                 "--set", f"data.cache={tmp_path / 'no-cache'}"])  # fmt: skip
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "per process" in text and "GPU" not in text.split("launch")[0].replace("GPUs that", "")
    assert "here in" in text and "measured on" in text  # the time estimate names what it scales
    assert f"missing: model.init: {tmp_path / 'nowhere'} does not exist" in text
    assert "missing: data.cache:" in text and "pixart prepare" in text
    assert "none scaling" not in text and "(not scaled with the batch)" in text
    xl = runner.invoke(app, ["train", str(ROOT / "recipes" / "stage2.yaml"), "--dry-run"])
    xl_text = " ".join(xl.output.split())
    assert "H200-hours" in xl_text and "× √(" in xl_text


def test_a_stop_between_log_lines_resumes_to_the_same_logged_losses(world, tmp_path):
    """SIGTERM during step 7 of a run that logs every 4 steps (its checkpoint: step 7, between two log lines): after
    resuming, the line logged at step 8 averages the same steps as the uninterrupted run's, and the weights agree."""
    import os
    import signal

    from pixart_cli.training.batches import batch_source
    from pixart_cli.training.loop import Interrupted, make_accelerator, train

    def run(out: Path, resume: str | None = None, stop_at: int | None = None):
        overrides = [a for a in stage2_args(world, out, steps=12, batch=4) if a != "--set"] + ["log.every=4"]
        recipe, resolved = load_recipe(ROOT / "recipes" / "stage2.yaml", overrides)
        accelerator, _ = make_accelerator(recipe)

        def on_step(step: int) -> None:
            if step == stop_at:
                os.kill(os.getpid(), signal.SIGTERM)  # seen by the loop at the next step boundary

        return train(recipe, resolved, batch_source(recipe, accelerator), resume=resume, on_step=on_step,
                     accelerator=accelerator)  # fmt: skip

    run(tmp_path / "full")
    with pytest.raises(Interrupted) as stopped:
        run(tmp_path / "split", stop_at=6)
    assert stopped.value.step % 4 != 0 and stopped.value.exit_code == 128 + signal.SIGTERM
    run(tmp_path / "split", resume="auto")
    full, split = ([(r["step"], r["loss"]) for r in map(json.loads, (tmp_path / name / "metrics.jsonl").open())]
                   for name in ("full", "split"))  # fmt: skip
    assert [step for step, _ in full] == [4, 8, 12] == [step for step, _ in split]
    assert [loss for _, loss in split] == pytest.approx([loss for _, loss in full], rel=1e-6)
    for name in ("model", "ema"):
        a, b = (load_file(tmp_path / run_ / "checkpoints" / "step-0000012" / f"{name}.safetensors")
                for run_ in ("full", "split"))  # fmt: skip
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


# -- resuming with another recipe, damaged checkpoints, nothing left to train --------------------------------------


@pytest.fixture(scope="module")
def four_steps(world, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4 (tests copy it before changing anything)."""
    run = tmp_path_factory.mktemp("four") / "run"
    result = runner.invoke(app, ["train", str(ROOT / "recipes" / "stage2.yaml"), *resume_args(world, run, steps=4)])
    assert result.exit_code == 0, result.output
    return run


def resume_args(world: Path, out: Path, steps: int) -> list[str]:
    saving = ["--set", "output.save_every=2", "--set", "output.keep_last=5"]
    return [*stage2_args(world, out, steps=steps, batch=4), *saving]


def snapshot(run: Path) -> dict[str, int]:
    # The lock file is the one file every run touches: it names who holds the folder (pixart_cli.io.exclusive_output).
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in run.rglob("*") if p.name != LOCK_FILE}


def test_resume_with_another_recipe_is_refused_naming_the_keys_and_writes_nothing(world, four_steps, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    before = snapshot(run)
    stage2 = str(ROOT / "recipes" / "stage2.yaml")
    args = ["train", stage2, *resume_args(world, run, steps=8), "--resume", "auto"]
    changed = ["--set", "optim.lr=0.002", "--set", "train.batch_size=5", "--set", "train.seed=7"]
    one_line_error(
        runner.invoke(app, [*args, *changed]),
        "optim.lr: 0.0005 → 0.002",
        "train.batch_size: 4 → 5",
        "train.seed: 43 → 7",
        "step-0000004",
    )
    one_line_error(runner.invoke(app, [*args, "--set", "model.config.depth=3"]), "model.config.depth: 2 → 3")
    older = str(run / "checkpoints" / "step-0000002")
    explicit = ["train", stage2, *resume_args(world, run, steps=8), "--resume", older]
    one_line_error(runner.invoke(app, [*explicit, "--set", "optim.decay=cosine"]), "optim.decay: none → cosine")
    assert snapshot(run) == before


def test_resume_changes_allow_length_saving_logging_and_precision_only():
    from pixart_cli.training.recipe import resume_changes

    stage2 = ROOT / "recipes" / "stage2.yaml"
    _, saved = load_recipe(stage2)
    allowed = ["train.steps=5", "output.dir=elsewhere", "output.keep_last=9", "log.every=1", "data.num_workers=0",
               "data.max_bad_fraction=0.5", "cluster.nodes=2", "model.gradient_checkpointing=false",
               "name=other"]  # fmt: skip
    assert resume_changes(saved, load_recipe(stage2, allowed)[1]) == ([], [])
    _, resolved = load_recipe(stage2, ["train.mixed_precision=fp32", "optim.betas=[0.9, 0.9]"])
    assert resume_changes(saved, resolved) == (
        ["optim.betas: [0.9, 0.999] → [0.9, 0.9]"],
        ["train.mixed_precision: bf16 → fp32"],
    )
    old = {k: v for k, v in saved.items() if k != "log"}  # a recipe.yaml written before a section existed: defaults
    assert resume_changes(old, saved) == ([], [])
    # Written before optim.name and log.trackers existed, with the retired log.tensorboard: still the same run.
    older = {**saved, "log": {**saved["log"], "tensorboard": True}, "optim": dict(saved["optim"])}
    del older["log"]["trackers"], older["log"]["wandb_mode"], older["optim"]["name"]
    assert resume_changes(older, saved) == ([], [])
    assert resume_changes(older, load_recipe(stage2, ["optim.name=adamw8bit"])[1])[0] == [
        "optim.name: adamw → adamw8bit"
    ]


def test_resume_with_more_steps_follows_the_new_schedule_from_the_first_resumed_step(world, tmp_path):
    """Linear decay, 5 warm-up steps: a 6-step run resumed with train.steps=10 equals a 10-step run (steps 1–6 have
    the same lr in both; the optimiser of the step-6 checkpoint holds the 6-step schedule's final lr, 0)."""
    stage2 = str(ROOT / "recipes" / "stage2.yaml")
    decay = ["--set", "optim.decay=linear"]
    assert runner.invoke(app, ["train", stage2, *stage2_args(world, tmp_path / "full", 10, 4), *decay]).exit_code == 0
    split = stage2_args(world, tmp_path / "split", 6, 4) + decay
    assert runner.invoke(app, ["train", stage2, *split]).exit_code == 0
    result = runner.invoke(app, ["train", stage2, *split, "--set", "train.steps=10", "--resume", "auto"])
    assert result.exit_code == 0, result.output
    for name in ("model", "ema"):
        a, b = (load_file(tmp_path / run / "checkpoints" / "step-0000010" / f"{name}.safetensors")
                for run in ("full", "split"))  # fmt: skip
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    last = [json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[-1]) for run in ("full", "split")]
    assert last[0]["lr"] == last[1]["lr"] == 0.0 and last[0]["loss"] != last[1]["loss"]  # windows of 5 and 4 steps


@pytest.mark.parametrize("damage", ["model-cut-short", "state-garbage", "no-ema"])
def test_resume_auto_falls_back_past_a_damaged_checkpoint_and_a_named_one_is_an_error(
    world, four_steps, tmp_path, damage
):
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    newest = run / "checkpoints" / "step-0000004"
    if damage == "model-cut-short":
        data = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
        file = "model.safetensors"
    elif damage == "state-garbage":
        (newest / "training_state.pt").write_bytes(b"\x00garbage" * 100)
        file = "training_state.pt"
    else:
        (newest / "ema.safetensors").unlink()
        file = "ema.safetensors"
    stage2 = str(ROOT / "recipes" / "stage2.yaml")
    named = runner.invoke(app, ["train", stage2, *resume_args(world, run, steps=6), "--resume", str(newest)])
    one_line_error(named, f"--resume {newest}: the checkpoint is damaged", file)
    result = runner.invoke(app, ["train", stage2, *resume_args(world, run, steps=6), "--resume", "auto"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"step-0000004 is damaged ({newest / file}" in text and "resuming from" in text, text
    assert f"resumed from {run / 'checkpoints' / 'step-0000002'} at step 2" in text
    assert [s for s, _ in checkpoint_dirs(run)] == [2, 4, 6]  # step 4 made again, the damaged one kept aside
    assert (run / "checkpoints" / "damaged-step-0000004" / "config.yaml").is_file()
    assert load_checkpoint(run / "checkpoints" / "step-0000004").ema_state_dict is not None


def test_resume_past_train_steps_is_refused_and_at_train_steps_has_nothing_to_do(world, four_steps, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    before = snapshot(run)
    stage2 = str(ROOT / "recipes" / "stage2.yaml")
    shorter = runner.invoke(app, ["train", stage2, *resume_args(world, run, steps=3), "--resume", "auto"])
    one_line_error(shorter, "step-0000004 is at step 4, already past train.steps=3: nothing to train")
    assert snapshot(run) == before
    same = runner.invoke(app, ["train", stage2, *resume_args(world, run, steps=4), "--resume", "auto"])
    assert same.exit_code == 0, same.output
    assert "nothing to do: the run is already at train.steps (4)" in same.output and "nan" not in same.output
    report = runner.invoke(app, ["train", stage2, *resume_args(world, run, steps=4), "--resume", "auto", "--json"])
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert json.loads(report.stdout.splitlines()[-1])["already_done"] is True
    assert json.loads(report.stdout.splitlines()[-1])["final_loss"] == pytest.approx(last["loss"])


def test_the_dry_run_finds_tar_shards_named_by_a_brace_pattern(tmp_path):
    from pixart_cli.training.plan import missing_inputs

    (tmp_path / "shards").mkdir()
    for i in range(2):
        (tmp_path / "shards" / f"{i:05d}.tar").write_bytes(b"")
    pattern = str(tmp_path / "shards" / "{00000..00001}.tar")
    recipe, _ = load_recipe(ROOT / "recipes" / "stage2.yaml", [f"data.path={pattern}", "data.kind=webdataset"])
    assert not [line for line in missing_inputs(recipe, "r.yaml") if line.startswith("data.path")]
    recipe, _ = load_recipe(ROOT / "recipes" / "stage2.yaml", [f"data.path={pattern.replace('01}', '02}')}"])
    assert [line for line in missing_inputs(recipe, "r.yaml") if line.startswith("data.path")]


def test_validation_loss_is_measured_plotted_and_leaves_training_alone(world, tmp_path):
    plain, validated, split = tmp_path / "plain", tmp_path / "validated", tmp_path / "split"
    held_out = (
        f"validation={{every: 4, batches: 2, path: {world / 'captions' / 'manifest.jsonl'}, cache: {world / 'cache'}}}"
    )
    assert (
        runner.invoke(
            app, ["train", str(ROOT / "recipes" / "stage2.yaml"), *stage2_args(world, plain, steps=10)]
        ).exit_code
        == 0
    )
    args = [*stage2_args(world, validated, steps=10), "--set", held_out]
    result = runner.invoke(app, ["train", str(ROOT / "recipes" / "stage2.yaml"), *args])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (validated / "validation.jsonl").read_text().splitlines()]
    measured = [(r["step"], r["val_loss"]) for r in records]
    assert [step for step, _ in measured] == [4, 8, 10] and all(math.isfinite(v) for _, v in measured)
    assert (validated / "val_loss.png").is_file()
    assert losses(validated) == losses(plain)  # measuring does not touch the training draws
    a = load_file(plain / "checkpoints" / "step-0000010" / "model.safetensors")
    b = load_file(validated / "checkpoints" / "step-0000010" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Fixed timesteps and noise: a resumed run measures the same values (one more at its own end).
    split_args = [*stage2_args(world, split, steps=6), "--set", held_out]
    assert runner.invoke(app, ["train", str(ROOT / "recipes" / "stage2.yaml"), *split_args]).exit_code == 0
    split_args = [*stage2_args(world, split, steps=10), "--set", held_out, "--resume", "auto"]
    assert runner.invoke(app, ["train", str(ROOT / "recipes" / "stage2.yaml"), *split_args]).exit_code == 0
    again = [json.loads(line) for line in (split / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == [4, 6, 8, 10]  # step 6: the shorter run's end
    again = {r["step"]: r["val_loss"] for r in again}
    for step, value in measured:
        assert again[step] == pytest.approx(value, abs=1e-6)
