"""`pixart serve`'s library (no web page): requests validated as `pixart sample`'s flags, each written into its own
folder exactly as `pixart sample` writes one, cancel between solver steps, the history read back after a restart."""

from __future__ import annotations

import dataclasses
import functools
import json
import shlex
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pixart_cli.cli import app
from pixart_cli.errors import PixartError
from pixart_cli.sampling.pipeline import Pipeline
from pixart_cli.serve.studio import REQUEST_FILE, GenerationRequest, ServeSettings, Studio, load_pipeline
from pixart_cli.shapesworld.demo import SHAPES_DEMO

runner = CliRunner()


@pytest.fixture(scope="module")
def demo() -> Pipeline:
    return Pipeline.from_pretrained(SHAPES_DEMO, device="cpu")


def studio(output: Path, demo: Pipeline, **kw) -> Studio:
    return Studio(ServeSettings(model=SHAPES_DEMO, output=output, **kw), lambda adapter: demo)


def test_a_request_is_written_as_pixart_sample_writes_it_and_its_command_gives_the_same_pixels(demo, tmp_path):
    s = studio(tmp_path / "out", demo)
    request = GenerationRequest.from_fields({"prompts": "a red circle\na blue square", "num_images": 2, "seed": 7,
                                             "steps": 4, "cfg": 3}, s.settings)  # fmt: skip
    result = s.generate(request)
    assert not result.cancelled and len(result.images) == 4
    assert result.folder.parent == tmp_path / "out" and (result.folder / REQUEST_FILE).is_file()
    # The reproduce command, run as written (into another folder), writes the same files, pixel for pixel.
    args = shlex.split(result.command)
    assert args[:2] == ["pixart", "sample"] and args[args.index("-o") + 1] == str(result.folder)
    args[args.index("-o") + 1] = str(tmp_path / "cli")
    assert runner.invoke(app, args[1:]).exit_code == 0
    for path, record in result.images:
        ours, theirs = Image.open(path), Image.open(tmp_path / "cli" / path.name)
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))
        assert json.loads(ours.info["pixart"]) == json.loads(theirs.info["pixart"])
        assert record["caption"].startswith(("a large", "a medium", "a small"))  # the demo completes prompts
    # Into its own folder, `pixart sample` confirms it (every image already there, none made again).
    again = runner.invoke(app, ["sample", "--json", *shlex.split(result.command)[2:]])
    assert again.exit_code == 0 and json.loads(again.stdout)["written"] == []


def test_requests_get_folders_of_their_own_and_the_history_survives_a_restart(demo, tmp_path):
    s = studio(tmp_path, demo)
    first = s.generate(GenerationRequest.from_fields({"prompts": "a red circle", "steps": 2}, s.settings))
    second = s.generate(GenerationRequest.from_fields({"prompts": "a red circle", "steps": 2}, s.settings))
    assert first.folder != second.folder and first.folder.name < second.folder.name
    restarted = studio(tmp_path, demo)
    assert [p for p, _ in restarted.history()] == [*[p for p, _ in second.images], *[p for p, _ in first.images]]
    assert restarted.history(limit=1) == [(second.images[0][0], second.images[0][1])]


def test_cancel_stops_at_a_solver_step_and_keeps_finished_images(demo, tmp_path):
    s = studio(tmp_path, demo)
    cancel = threading.Event()
    request = GenerationRequest.from_fields({"prompts": "a red circle", "num_images": 6, "steps": 3, "seed": 0},
                                            s.settings)  # fmt: skip

    def progress(done: float, total: int) -> None:
        if done >= 4:  # the first batch of 4 is written; stop inside the second
            cancel.set()

    result = s.generate(request, progress=progress, cancel=cancel)
    assert result.cancelled and len(result.images) == 4
    # Completing it is the reproduce command: the 4 are skipped, the other 2 made.
    done = runner.invoke(app, ["sample", "--json", *shlex.split(result.command)[2:]])
    assert done.exit_code == 0 and len(json.loads(done.stdout)["written"]) == 2


def test_a_request_cancelled_while_it_waited_makes_nothing(demo, tmp_path):
    s = studio(tmp_path, demo)
    cancel = threading.Event()
    cancel.set()
    result = s.generate(GenerationRequest.from_fields({"prompts": "a red circle"}, s.settings), cancel=cancel)
    assert result.cancelled and result.folder is None and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"prompts": ""}, "at least one prompt"),
        ({"prompts": "   \n  "}, "at least one prompt"),
        ({"prompts": "x" * 5000}, "at most 2,000"),
        ({"prompts": "a red circle\ud800"}, "not valid Unicode"),
        ({"prompts": ["ok", 3]}, "list of strings"),
        ({"prompts": "a", "num_images": 10**9}, "1 to 16 images"),
        ({"prompts": "a", "num_images": 0}, "1 to 16 images"),
        ({"prompts": "a", "steps": 10**6}, "steps must be in [1, 1000]"),
        ({"prompts": "a", "steps": 0}, "steps must be in [1, 1000]"),
        ({"prompts": "a", "width": 0}, "width must be"),
        ({"prompts": "a", "cfg": 10**400}, "cfg must be"),
        ({"prompts": "a", "cfg": float("nan")}, "cfg must be"),
        ({"prompts": "a", "seed": -1}, "seed must be"),
        ({"prompts": "a", "width": 10**9}, "width must be"),
        ({"prompts": "a", "sampler": "euler"}, "unknown sampler"),
        ({"prompts": "a", "lora": "../../etc/passwd"}, "not one of this server's adapters"),
        ({"prompts": "a", "output": "/etc"}, "unknown field 'output'"),
        ({"prompts": "a", "steps": "20"}, "steps: expected int or null, got str"),
        ({"prompts": "a", "num_images": True}, "num_images: expected int, got bool"),
        (["a red circle"], "a request is a JSON object"),
    ],
)
def test_hostile_requests_are_refused_naming_the_field(fields, needle, tmp_path):
    settings = ServeSettings(model=SHAPES_DEMO, output=tmp_path)
    with pytest.raises(PixartError, match=None) as caught:
        GenerationRequest.from_fields(fields, settings)
    assert needle in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_sizes_the_model_refuses_write_nothing_and_multi_scale_models_snap_to_their_buckets(
    demo, tiny_t5, tiny_vae, tmp_path
):
    from pixart_cli.models import PixArtConfig
    from pixart_cli.tiny import make_tiny_pixart

    config = PixArtConfig(depth=1, hidden_size=32, num_heads=2, patch_size=2, input_size=4, caption_channels=32)
    model = make_tiny_pixart(tmp_path / "model", config, text_encoder=str(tiny_t5), vae=str(tiny_vae), seed=0)
    s = Studio(ServeSettings(model=str(model), output=tmp_path / "out"), lambda a: Pipeline.from_pretrained(model))
    for width in (40, 16_000):  # not a multiple of the patch grid (16 px); far beyond the trained grid
        with pytest.raises(PixartError, match=r"multiple of 16|trained"):
            s.generate(GenerationRequest.from_fields({"prompts": "a", "width": width, "height": 32}, s.settings))
    assert not (tmp_path / "out").exists()
    # The demo is multi-scale: any asked size becomes its nearest trained bucket (bounded by the table).
    wide = studio(tmp_path / "demo", demo)
    fields = {"prompts": "a red circle", "width": 16_000, "height": 64, "steps": 1}
    result = wide.generate(GenerationRequest.from_fields(fields, wide.settings))
    assert result.size == (32, 128)  # its widest bucket


def test_an_adapter_picked_per_request_gives_what_its_reproduce_command_gives(tiny_t5, tiny_vae, tmp_path):
    from tests.adapters.test_lora import make_adapter
    from tests.utils import TINY_PIXART

    config = dataclasses.replace(TINY_PIXART, caption_channels=32)  # the tiny T5's width
    adapter, base, _ = make_adapter(tmp_path, config=config)
    settings = ServeSettings(model=str(base), output=tmp_path / "out", adapters=((str(adapter), 0.5),),
                             t5=str(tiny_t5), vae=str(tiny_vae))  # fmt: skip
    assert settings.adapter_names() == [f"{adapter}:0.5"]
    s = Studio(settings, functools.partial(load_pipeline, settings))
    fields = {"prompts": "a red cube on top of a blue sphere", "steps": 2, "seed": 3}
    plain = s.generate(GenerationRequest.from_fields(fields, settings))
    tuned = s.generate(GenerationRequest.from_fields({**fields, "lora": f"{adapter}:0.5"}, settings))
    (plain_png, _), (tuned_png, record) = plain.images[0], tuned.images[0]
    assert record["model"] == f"{base} + {adapter}:0.5"
    assert not np.array_equal(np.asarray(Image.open(plain_png)), np.asarray(Image.open(tuned_png)))
    args = shlex.split(tuned.command)  # names --lora, --t5 and --vae
    assert {"--lora", "--t5", "--vae", "--device"} <= set(args)
    args[args.index("-o") + 1] = str(tmp_path / "cli")
    assert runner.invoke(app, args[1:]).exit_code == 0
    again = Image.open(tmp_path / "cli" / tuned_png.name)
    assert np.array_equal(np.asarray(again), np.asarray(Image.open(tuned_png)))
    assert json.loads(again.info["pixart"]) == json.loads(Image.open(tuned_png).info["pixart"])


def test_serve_settings_are_validated(tmp_path):
    (tmp_path / "file").write_text("x")
    cases = [({"port": 70_000}, "--port"), ({"max_images": 0}, "--max-images"), ({"queue_size": 0}, "--queue-size"),
             ({"output": tmp_path / "file"}, "not a directory")]  # fmt: skip
    for kw, needle in cases:
        with pytest.raises(PixartError, match=needle):
            ServeSettings(**{"model": SHAPES_DEMO, "output": tmp_path, **kw})
