"""The shipped ShapesWorld assets: the demo is the default model, the T5 is reproducible, and a regression floor
keeps the demo's ShapesBench level from dropping."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from pixart_cli.cli import app
from pixart_cli.components.resolve import ASSETS
from pixart_cli.shapesworld.demo import SHAPES_DEMO, build_shapes_t5, counted_words, demo_model, unknown_words
from pixart_cli.shapesworld.prompts import complete_prompt

runner = CliRunner()

# A regression test, not a correctness test: these floors come from the shipped model's own output and guard it
# against getting worse (correctness is tested against independent references elsewhere).
# ShapesBench on the first 48 held-out prompts (seed 0, one image each, DPM-Solver++ 20 steps, CFG 4.5, 64×64) for
# the shipped model (2026-12-04: the end of stage 3, 6,000 CPU steps × 32 at 64 px from the 2026-11-27 stage-2
# demo): measured color 48/48, shape 42/48, spatial 18/24 (of the prompts with a relation), complex 30/48. The
# floors sit two prompts lower (colour one), for float differences between machines; docs/shapes.md has the
# 200-prompt numbers. The 2026-11-27 stage-2 demo (32 px) scored 47/48, 37/48, 14/24, 29/48. Raise the floors
# when a better model ships.
SHIPPED_LEVEL = {"color": 47 / 48, "shape": 40 / 48, "spatial": 16 / 24, "complex": 28 / 48}


def test_the_demo_is_the_default_model_and_warns_outside_its_vocabulary(tmp_path):
    assert demo_model() == SHAPES_DEMO
    assert unknown_words("a red circle to the left of a blue square") == []
    assert unknown_words("an orange circle above a white cross") == []  # "an": from the varied captions
    assert unknown_words("a corgi astronaut") == ["corgi", "astronaut"]
    result = runner.invoke(app, ["sample", "a corgi astronaut", "-n", "2", "--steps", "4", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "knows shapes and colours" in result.output and "corgi" in result.output
    assert len(list(tmp_path.glob("*.png"))) == 2


def test_the_demo_says_it_draws_no_plurals_or_counts(tmp_path):
    """Its captions name each object once, in the singular: "two red squares" gets that said, not just "unknown"."""
    assert counted_words("two red squares") == ["two", "squares"]
    assert counted_words("a circle and 3 big white crosses") == ["3", "crosses"]
    assert counted_words("two shapes on a grey background") == []  # a sparse caption the demo was trained on
    assert counted_words("a red square to the left of a blue square") == []
    result = runner.invoke(app, ["sample", "two red squares", "-n", "1", "--steps", "2", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "the demo model draws single objects named in the singular ('a red square')" in result.output
    assert "plurals and counts ('two red squares') are outside what it learned (asked for here: two, squares)" in (
        result.output
    )
    assert "unknown to the demo model" not in result.output


def test_the_demo_completes_short_prompts_and_says_so(tmp_path):
    """Short prompts get the sizes and background the demo's captions always name; the CLI prints and records the
    caption, --no-complete-prompts feeds the prompt as written; ShapesBench records --complete-prompts."""
    prompt = "a red circle to the left of a blue square"
    args = ["sample", prompt, "-n", "2", "--steps", "2", "-o", str(tmp_path / "on")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "completing prompts" in result.output and "--no-complete-prompts" in result.output
    records = [json.loads(line) for line in (tmp_path / "on" / "manifest.jsonl").read_text().splitlines()]
    assert [r["caption"] for r in records] == [complete_prompt(prompt, seed) for seed in (0, 1)]
    result = runner.invoke(app, [*args[:-1], str(tmp_path / "off"), "--no-complete-prompts"])
    assert result.exit_code == 0 and "completing" not in result.output
    assert "caption" not in json.loads((tmp_path / "off" / "manifest.jsonl").read_text().splitlines()[0])
    bench = ["eval-compbench", "--bench", "shapes", "-m", SHAPES_DEMO, "--limit", "2", "--images-per-prompt", "1"]
    result = runner.invoke(app, [*bench, "--steps", "2", "--prompt-style", "short", "--complete-prompts", "-o",
                                 str(tmp_path / "bench")])  # fmt: skip
    assert result.exit_code == 0, result.output
    settings = json.loads((tmp_path / "bench" / "compbench_report.json").read_text())["settings"]
    assert settings["generation"]["complete_prompts"] is True and settings["prompt_style"] == "short"


def test_the_demo_is_the_end_of_stage_3_and_draws_other_aspect_ratios(tmp_path):
    """The shipped demo is the stage-3 model: 64 px, multi-scale (size and aspect-ratio conditioning)."""
    from pixart_cli.checkpoints.format import load_checkpoint

    config = load_checkpoint(SHAPES_DEMO).config
    assert config.multi_scale and config.input_size == 64 and config.interpolation_scale == 2.0
    args = ["sample", "a red circle above a blue square", "-n", "1", "--steps", "2", "-o", str(tmp_path)]
    result = runner.invoke(app, [*args, "--width", "80", "--height", "48"])
    assert result.exit_code == 0, result.output
    assert [Image.open(f).size for f in tmp_path.glob("*.png")] == [(80, 48)]
    assert "wrote 1 image (80×48)" in result.output  # width×height, as the options and the docs say it


def test_the_shipped_t5_is_what_build_shapes_t5_makes(tmp_path):
    rebuilt = build_shapes_t5(tmp_path / "t5")
    shipped = ASSETS / "shapes-t5"
    assert (rebuilt / "spiece.model").read_bytes() == (shipped / "spiece.model").read_bytes()
    a, b = load_file(rebuilt / "model.safetensors"), load_file(shipped / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_assets_fit_their_budget():
    total = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file())
    assert total <= 30 * 2**20, f"{total / 2**20:.1f} MB of shipped assets, over the 30 MB budget"


def test_the_shipped_dit_starts_stage_2(tmp_path):
    """builtin:shapes-dit is a class-conditional DiT in DiT's key layout; init-from-dit makes a PixArt of it that
    computes what the DiT computes (with the null class) at t = 500, here checked on one input."""
    from pixart_cli.checkpoints.format import instantiate, load_checkpoint
    from pixart_cli.models import DiTConfig

    dit = load_checkpoint("builtin:shapes-dit")
    assert isinstance(dit.config, DiTConfig) and dit.config.num_classes == 48
    assert {"y_embedder.embedding_table.weight", "blocks.0.adaLN_modulation.1.weight"} <= dit.state_dict.keys()
    args = ["init-from-dit", "builtin:shapes-dit", "-o", str(tmp_path / "pixart"), "--caption-channels", "64"]
    result = runner.invoke(app, [*args, "--max-length", "64"])
    assert result.exit_code == 0, result.output
    pixart = instantiate(load_checkpoint(tmp_path / "pixart"), dtype=torch.float32)
    dit_model = instantiate(dit, dtype=torch.float32)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 500)
    caption = torch.randn(2, 64, 64)
    with torch.no_grad():
        expected = dit_model(x, t, torch.full((2,), 48))  # the null class
        got = pixart(x, t, caption, torch.ones(2, 64, dtype=torch.long))
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)


@pytest.mark.slow  # ~30–55 s on a 2-core CPU: runs in CI with -m slow
def test_shipped_model_level_does_not_regress():
    from pixart_cli.sampling.pipeline import Pipeline
    from pixart_cli.sampling.settings import SampleSettings
    from pixart_cli.shapesworld.detect import score_images
    from pixart_cli.shapesworld.prompts import heldout_prompts

    pipeline = Pipeline.from_pretrained(SHAPES_DEMO, device="cpu")
    prompts = heldout_prompts(48, 0)
    settings = SampleSettings(steps=20, cfg=4.5, seed=0, batch_size=24)
    images = [image for _, image in pipeline.generate(settings.jobs([p.text for p in prompts]), settings)]
    report = score_images(images, [p.spec for p in prompts])
    for category, level in SHIPPED_LEVEL.items():
        assert report.categories[category] >= level, (category, report.categories)


def test_the_readme_prompt_is_drawn_as_asked():
    """The README's first command: "a red circle to the left of a blue square", completed as the demo samples it.
    Measured on seeds 0–15: 16/16 images exactly right (both objects, relation, nothing else) completed, 1/16 as
    written. The floor allows one miss in 8 for float differences between machines."""
    from pixart_cli.sampling.pipeline import Pipeline
    from pixart_cli.sampling.settings import SampleSettings
    from pixart_cli.shapesworld.detect import score_image
    from pixart_cli.shapesworld.prompts import ObjectSpec, PromptSpec

    spec = PromptSpec((ObjectSpec("circle", "red"), ObjectSpec("square", "blue")), "left of")
    pipeline = Pipeline.from_pretrained(SHAPES_DEMO, device="cpu")
    settings = SampleSettings(steps=20, cfg=4.5, seed=0, num_images_per_prompt=8, batch_size=8)
    jobs = settings.jobs(["a red circle to the left of a blue square"])
    checks = [score_image(image, spec) for _, image in pipeline.generate(jobs, settings)]
    assert sum(all(v for v in c.values() if v is not None) for c in checks) >= 7, checks


def test_shape_word_probe_runs_on_the_demo():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "experiments" / "shapesworld" / "shape_word_probe.py"
    args = ["builtin:shapes-demo", "--scenes", "4", "--t0", "300", "--steps", "10", "--word", "colour"]
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "t0= 300  true caption: colour right" in result.stdout and "follows the caption" in result.stdout
    result = subprocess.run([sys.executable, str(script), *args, "--loss"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "t0= 300  true caption" in result.stdout and "swapped" in result.stdout


def test_relation_probe_runs_on_the_demo():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "experiments" / "shapesworld" / "relation_probe.py"
    args = ["builtin:shapes-demo", "--images", "1", "--steps", "4"]
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "yellow left of blue" in result.stdout and "asked mirrored (seen)" in result.stdout
    assert "\nall " in result.stdout


def test_the_shipped_stage1_dit_draws_its_classes_colours(tmp_path):
    """One image per seen class, ShapesBench sampling: measured colour 1.00 (168 images), shape 0.19 (chance)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "experiments" / "shapesworld" / "dit_class_probe.py"
    args = ["builtin:shapes-dit", "--per-class", "1", "--save", str(tmp_path / "grid.png")]
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["images"] == 42 and report["colour"] >= 40 / 42 and report["presence"] >= 40 / 42
    assert (tmp_path / "grid.png").is_file()
