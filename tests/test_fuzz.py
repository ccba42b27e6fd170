"""Bad input, fuzzed: mutated recipes, random command-line values and broken checkpoint files.

Every case must end cleanly: success (exit 0), or one line starting ``error:`` with exit code 2 (a click usage
error, also exit 2, for values of the wrong type), never a traceback, and never a write outside the command's
output. Examples are derandomised (the same on every run) and kept few, so the suite stays fast.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import sys
import tempfile
import traceback
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from pixart_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {p.name: p for p in (ROOT / "recipes").glob("stage*.yaml")}
runner = CliRunner()
FUZZ = settings(
    max_examples=int(os.environ.get("PIXART_FUZZ_EXAMPLES", "30")),  # raise it for a longer hunt
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class _CurrentStderr:
    """A stream that writes to whatever ``sys.stderr`` is now (CliRunner swaps it for every invocation)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


@pytest.fixture(autouse=True)
def isolated(monkeypatch):
    """Offline (a random model name may look like a hub id), one thread, and the hub libraries' log handlers
    writing to the current stderr: they keep the stream they were created with, which CliRunner closes."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    handlers = [
        handler
        for module in (diffusers_logging, transformers_logging)
        for handler in module._get_library_root_logger().handlers
        if type(handler) is logging.StreamHandler
    ]
    streams = [handler.stream for handler in handlers]
    for handler in handlers:  # not setStream: it flushes the old stream, which may be closed already
        handler.stream = _CurrentStderr()
    yield
    for handler, stream in zip(handlers, streams, strict=True):
        handler.stream = stream
    torch.set_num_threads(threads)


# -- checking one invocation --------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under ``root`` with its size and modification time."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            stat = path.stat()
            out[str(path.relative_to(root))] = (0 if path.is_dir() else stat.st_size, stat.st_mtime_ns)
    return out


def _inside(path: str, outputs: list[str]) -> bool:
    return any(path == o or path.startswith(o.rstrip("/") + "/") for o in outputs)


@contextlib.contextmanager
def workdir(base: Path) -> Iterator[Path]:
    """A fresh directory, also the working directory, for one example."""
    with tempfile.TemporaryDirectory(dir=base) as name:
        previous = os.getcwd()
        os.chdir(name)
        try:
            yield Path(name)
        finally:
            os.chdir(previous)


def invoke(args: list[str], root: Path, outputs: list[str]) -> tuple[int, str]:
    """Run the CLI in-process; check it ended cleanly and changed nothing under ``root`` but ``outputs`` (paths
    relative to ``root``). Returns (exit code, output)."""
    before = snapshot(root)
    result = runner.invoke(app, args)
    after = snapshot(root)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        trace = "".join(traceback.format_exception(result.exception))
        raise AssertionError(f"traceback for {args}:\n{trace}")
    output = result.output
    assert result.exit_code in (0, 2), (args, result.exit_code, output)
    assert "Traceback" not in output, (args, output)
    if result.exit_code == 2 and not output.startswith("Usage:"):
        last = output.strip().split("\n")[-1]  # the error is the last line (warnings may come before it)
        assert last.startswith("error:") and output.count("error:") == 1, (args, output)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    # Directories that hold an output change their mtime when it is created; nothing else may change.
    stray = {k for k in changed if not _inside(k, outputs) and not any(_inside(o, [k]) for o in outputs)}
    assert not stray, (args, sorted(stray))
    return result.exit_code, output


# -- recipes ----------------------------------------------------------------------------------------------------


def _paths(node: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    return out


SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-3, 300)
    | st.sampled_from([0, -1, 2**31, 2**63, -(2**63), 2**70, 10**6])
    | st.floats(allow_nan=True, allow_infinity=True, width=64)
    | st.text(max_size=12)
    | st.sampled_from(["", "none", "PixArt", "DiT", "PixArt-XL/2", "fp16", "1e-4", "{", "[1, 2]", "~"])
)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=5,
)


def _like(value: object) -> st.SearchStrategy:
    """Values of the same type as ``value``: what a typo or a wrong number gives."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.integers(-3, 100) | st.sampled_from([0, -1, 2**31, 2**63, -(2**63), 10**9])
    if isinstance(value, float):
        return st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, -1.0, 1.0, 1e30, -1e-30])
    if isinstance(value, str):
        return st.text(max_size=12) | st.sampled_from(["", "none", "PixArt-XL/2", "DiT-XL/2", "bf16"])
    if isinstance(value, list):
        return st.lists(SCALARS, max_size=3)
    if isinstance(value, dict):  # model.config: field names the model configs know, any values
        fields = ["depth", "hidden_size", "num_heads", "patch_size", "input_size", "mlp_ratio", "max_length"]
        return st.dictionaries(st.sampled_from(fields), st.integers(-2, 2000) | SCALARS, max_size=3)
    return VALUES


@st.composite
def mutated_recipe(draw) -> tuple[str, str]:
    """(recipe YAML text, what was done): a shipped recipe with one to three keys set, deleted or added."""
    name = draw(st.sampled_from(sorted(RECIPES)))
    raw = yaml.safe_load(RECIPES[name].read_text())
    done = [name]
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(raw)
        path = draw(st.sampled_from(paths)) if paths else ()
        action = draw(st.sampled_from(["set", "set", "delete", "add"]))
        parent = raw
        for key in path[:-1]:
            parent = parent[key]
        if not isinstance(parent, dict) or not path:
            continue
        if action == "set":
            parent[path[-1]] = draw(_like(parent[path[-1]]) | VALUES)  # often the right type, out of range
        elif action == "delete":
            parent.pop(path[-1], None)
        else:
            target = parent[path[-1]] if isinstance(parent[path[-1]], dict) else parent
            target[draw(st.text(min_size=1, max_size=8))] = draw(VALUES)
        done.append(f"{action} {'.'.join(map(str, path))}")
    return yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), "; ".join(done)


@FUZZ
@given(recipe=mutated_recipe())
def test_mutated_recipes_dry_run_or_fail_with_one_line(recipe, tmp_path):
    text, _ = recipe
    with workdir(tmp_path) as root:
        (root / "recipe.yaml").write_text(text)
        invoke(["train", "recipe.yaml", "--dry-run"], root, outputs=[])


EDGES = {bool: [None], int: [0, -1, 2**63, "7"], float: [-1.0, float("nan"), float("inf"), "x"], str: ["", 7]}
MORE_EDGES = {bool: ["yes"], int: [1.5, 10**6], float: [0.0, 1e308], str: [[], "../../../../etc/passwd"]}


def _leaf_edges(names: list[str], edges: dict) -> list[tuple[str, str, object]]:
    """(recipe, dotted key, value) for every scalar leaf of the recipes and every edge value of its type."""
    cases = []
    for name in names:
        raw = yaml.safe_load(RECIPES[name].read_text())
        for path in _paths(raw):
            node = raw
            for key in path:
                node = node[key]
            cases += [(name, ".".join(path), value) for value in edges.get(type(node), [])]
    return cases


def _check_edge(name: str, key: str, value: object, base: Path) -> None:
    raw = yaml.safe_load(RECIPES[name].read_text())
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node[part]
    node[leaf] = value
    with workdir(base) as root:
        (root / "recipe.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        invoke(["train", "recipe.yaml", "--dry-run"], root, outputs=[])


def test_every_recipe_value_at_its_edges(tmp_path):
    """Each scalar of the stage-2 recipe set to zero, negative, huge, nan, inf or a value of the wrong type."""
    for case in _leaf_edges(["stage2.yaml"], EDGES):
        _check_edge(*case, tmp_path)


@pytest.mark.slow
def test_every_recipe_value_at_its_edges_in_every_recipe(tmp_path):
    edges = {kind: EDGES[kind] + MORE_EDGES[kind] for kind in EDGES}
    for case in _leaf_edges(sorted(RECIPES), edges):
        _check_edge(*case, tmp_path)


@FUZZ
@given(data=st.binary(max_size=200) | st.text(max_size=200))
def test_garbage_recipe_files_fail_with_one_line(data, tmp_path):
    with workdir(tmp_path) as root:
        path = root / "recipe.yaml"
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
        code, _ = invoke(["train", "recipe.yaml", "--dry-run"], root, outputs=[])
        assert code == 2


SECTION_KEYS = sorted(
    ".".join(map(str, p)) for p in _paths(yaml.safe_load((ROOT / "recipes" / "stage2.yaml").read_text()))
)
OVERRIDE_KEYS = [*SECTION_KEYS, "optim.lrr", "x", "", "model..config", "train.steps.x"]
OVERRIDE_TEXT = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["1e-4", "-1", "0", ".nan", ".inf", "null", "[]", "{}", "{depth: x}", "true", "2**70", "'x"]),
)


@FUZZ
@given(overrides=st.lists(st.tuples(st.sampled_from(OVERRIDE_KEYS), OVERRIDE_TEXT), min_size=1, max_size=3))
def test_random_set_overrides_dry_run_or_fail_with_one_line(overrides, tmp_path):
    args = ["train", str(RECIPES["stage2.yaml"]), "--dry-run"]
    for key, value in overrides:
        args += ["--set", f"{key}={value}"]
    with workdir(tmp_path) as root:
        invoke(args, root, outputs=[])


# -- command-line values ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """A tiny T5, a tiny pixel-space PixArt checkpoint (32 px) and a tiny captioned image folder."""
    from PIL import Image

    from pixart_cli.models import PixArtConfig
    from pixart_cli.tiny import make_tiny_pixart, make_tiny_t5

    root = tmp_path_factory.mktemp("assets")
    words = ["a red circle", "a blue square on the left", "two green triangles", "a small yellow star"] * 20
    make_tiny_t5(root / "t5", words, d_model=32)
    config = PixArtConfig(
        depth=1, hidden_size=32, num_heads=2, patch_size=4, input_size=32, in_channels=3, caption_channels=32,
        max_length=8,
    )  # fmt: skip
    make_tiny_pixart(root / "model", config, text_encoder=str(root / "t5"), vae="none", seed=0)
    (root / "data").mkdir()
    for k in range(4):
        Image.new("RGB", (24 + 8 * k, 32), (60 * k, 0, 0)).save(root / "data" / f"{k}.png")
        (root / "data" / f"{k}.txt").write_text(words[k])
    return root


def place(assets: Path, root: Path, names: tuple[str, ...] = ("t5", "model", "data")) -> None:
    """Copy the assets into the example's directory (the commands may read them, never change them)."""
    for name in names:
        shutil.copytree(assets / name, root / name)


def _sometimes_wrong(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly ``valid`` values, one draw in six a short random string (click rejects most: a usage error)."""
    return st.integers(0, 5).flatmap(lambda k: st.text(max_size=4) if k == 0 else valid)


INTS = st.integers(-3, 40) | st.sampled_from([0, -1, 2**63, -(2**70)])
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)
DEVICES = st.sampled_from(["cpu", "cuda", "cuda:7", "meta", "mps", "xla", "cpu:0", "", "gpu", "cpu:-1"])
DTYPES = st.sampled_from(["fp32", "fp16", "bf16", "float64", "int8", ""])
FLAG = st.sampled_from([None, True])  # left out, or given


@st.composite
def mutated_command(draw, command: list[str], base: dict, options: dict) -> list[str]:
    """``command`` with its ``base`` options, one to three of which (or of ``options``) are replaced by random values.

    A value of None leaves the option out, True gives a flag; the key "args" holds the positional arguments.
    """
    values = dict(base)
    for name in draw(st.lists(st.sampled_from(sorted(options)), min_size=1, max_size=3, unique=True)):
        values[name] = draw(options[name])
    args = [*command, *values.pop("args", [])]
    for name, value in values.items():
        if value is not None:
            args += [name] if value is True else [name, str(value)]
    return args


SAMPLE_BASE = {"args": ["a red circle"], "--model": "model", "-n": 1, "--steps": 2, "--device": "cpu", "-o": "out"}
SAMPLE_OPTIONS = {
    "args": st.lists(st.sampled_from(["a red circle", "", " ", "ünïcödé ☃", "x" * 300, "[bold]x[/]"]), max_size=2),
    "--model": st.sampled_from(["model", "model/config.yaml", "model/model.safetensors", "missing", "a/b", "t5"]),
    "-n": _sometimes_wrong(st.integers(-2, 3)),
    "--steps": _sometimes_wrong(st.integers(-2, 4) | st.none()),
    "--cfg": _sometimes_wrong(FLOATS),
    "--seed": _sometimes_wrong(st.integers() | st.sampled_from([2**64, -(2**63) - 1, 2**100, -1])),
    "--size": _sometimes_wrong(st.integers(-8, 64)),
    "--height": _sometimes_wrong(st.integers(-8, 64)),
    "--width": _sometimes_wrong(st.integers(-8, 64)),
    "--batch-size": _sometimes_wrong(st.integers(-2, 3)),
    "--sampler": st.sampled_from(["dpm-solver", "sa-solver", "ddim", "iddpm", "euler", ""]),
    "--prompts-file": st.sampled_from(["missing.txt", "data", "data/0.png", "data/0.txt"]),
    "--device": DEVICES,
    "--dtype": DTYPES,
    "--negative-prompt": st.text(max_size=10),
    "--t5": st.sampled_from(["t5", "missing", "model", "none", None]),
    "--vae": st.sampled_from(["none", "missing", "t5", "NONE", None]),
    "--grid": FLAG,
    "--offload": FLAG,
    "-o": st.sampled_from(["out", "data/0.txt", "out/a/b"]),
}


@FUZZ
@given(args=mutated_command(["sample"], SAMPLE_BASE, SAMPLE_OPTIONS))
def test_random_sample_arguments(args, assets, tmp_path):
    output = args[args.index("-o") + 1] if "-o" in args else "samples"
    with workdir(tmp_path) as root:
        place(assets, root)  # data/ holds 0.txt (a prompts file) and 0.png (not one)
        before = snapshot(root)
        code, _ = invoke(args, root, outputs=[output])
        if code == 2:  # nothing written
            assert snapshot(root) == before, args


CONVERT_BASE = {"args": ["model"], "-o": "out"}
CONVERT_OPTIONS = {
    "args": st.sampled_from([["model"], ["model/model.safetensors"], ["missing"], ["t5"], ["."], []]),
    "-o": st.sampled_from(["out", "out/nested/deeper", "model", "t5/out", "model/model.safetensors", ""]),
    "--to": st.sampled_from(["pixart", "diffusers", "official", "onnx", ""]),
    "--dtype": DTYPES,
    "--num-heads": _sometimes_wrong(INTS),
    "--max-length": _sometimes_wrong(INTS),
    "--t5": st.sampled_from(["t5", "missing", "model"]),
    "--vae": st.sampled_from(["none", "missing", "t5"]),
    "--ema": FLAG,
    "--no-ema": FLAG,
    "--overwrite": FLAG,
}


@FUZZ
@given(args=mutated_command(["convert"], CONVERT_BASE, CONVERT_OPTIONS))
def test_random_convert_arguments(args, assets, tmp_path):
    output = args[args.index("-o") + 1] if "-o" in args else "out"
    with workdir(tmp_path) as root:
        place(assets, root, ("t5", "model"))
        before = snapshot(root)
        code, _ = invoke(args, root, outputs=[output] if output else [])
        if code == 2:  # nothing written: not even an existing output was touched
            assert snapshot(root) == before, args


PREPARE_BASE = {
    "args": ["data"], "-o": "cache", "--t5": "t5", "--vae": "none", "--resolution": 32, "--max-length": 8,
    "--workers": 0, "--device": "cpu",
}  # fmt: skip
PREPARE_OPTIONS = {
    "args": st.sampled_from([["data"], ["missing"], ["data/0.png"], ["model"], ["data/0.txt"], []]),
    "-o": st.sampled_from(["cache", "data", "model", "data/0.png", None]),
    "--t5": st.sampled_from(["t5", "missing", "model", None]),
    "--vae": st.sampled_from(["none", "missing", "t5", "", None]),
    "--resolution": _sometimes_wrong(st.integers(-16, 48)),
    "--kind": st.sampled_from(["auto", "captions", "manifest", "classes", "zip"]),
    "--batch-size": _sometimes_wrong(INTS),
    "--shard-size": _sometimes_wrong(INTS),
    "--max-length": _sometimes_wrong(st.integers(-2, 16)),
    "--device": DEVICES,
    "--dtype": DTYPES,
    "--storage": st.sampled_from(["fp16", "fp32", "int8"]),
    "--max-bad-fraction": _sometimes_wrong(FLOATS),
    "--workers": _sometimes_wrong(st.integers(-2, 1)),
    "--set": st.sampled_from(["train.steps=3", "x"]),
    "--multi-scale": FLAG,
    "--keep-empty-captions": FLAG,
    "--overwrite": FLAG,
}


@FUZZ
@given(args=mutated_command(["prepare"], PREPARE_BASE, PREPARE_OPTIONS))
def test_random_prepare_arguments(args, assets, tmp_path):
    with workdir(tmp_path) as root:
        place(assets, root)
        before = snapshot(root)
        code, _ = invoke(args, root, outputs=["cache", "data-cache", "missing-cache", "model-cache", "data/0-cache"])
        if code == 2:  # every image here is readable: an error is the input's, found before the first write
            assert snapshot(root) == before, args


@FUZZ
@given(garbage=st.binary(min_size=1, max_size=24), where=st.sampled_from(["manifest", "caption"]), loop=FLAG)
def test_garbage_bytes_in_a_dataset_prepare_or_fail_with_one_line(garbage, where, loop, assets, tmp_path):
    """Bytes that are not UTF-8 text in a manifest line (an error naming the line) or in a caption file (that
    image skipped and counted), and a symlink loop in the folder (read once)."""
    with workdir(tmp_path) as root:
        place(assets, root, ("t5", "data"))
        if loop:
            (root / "data" / "loop").symlink_to(".")
        if where == "manifest":
            lines = [
                json.dumps({"path": f"{k}.png", "caption": (root / "data" / f"{k}.txt").read_text()}) for k in range(4)
            ]
            garbage = garbage.replace(b"\n", b"")  # kept on line 3
            body = "\n".join(lines).encode().replace(b"two green", b"two " + garbage + b" green")
            (root / "data" / "manifest.jsonl").write_bytes(body + b"\n")
            data = "data/manifest.jsonl"
        else:
            (root / "data" / "1.txt").write_bytes(garbage)
            data = "data"
        before = snapshot(root)
        args = ["prepare", data, "-o", "cache", "--t5", "t5", "--vae", "none", "--resolution", "32", "--max-length"]
        args += ["8", "--workers", "0", "--device", "cpu", "--max-bad-fraction", "0.5"]
        code, output = invoke(args, root, outputs=["cache"])
        if code == 2:  # nothing written
            assert snapshot(root) == before, output
        if where == "caption":  # never fatal: skipped and counted at worst
            assert code == 0, output
            assert re.search(r"cached [34] of [34] images", output), output  # 3 of 3: a blank caption
        if not _is_utf8(garbage):
            expected = "unreadable image(s) skipped" if where == "caption" else "manifest.jsonl:3: not UTF-8 text"
            assert expected in output, output
        elif where == "caption" and b"\x00" in garbage:
            assert "caption is binary" in output, output


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@FUZZ
@given(
    values=st.tuples(
        st.sampled_from(["auto", "missing", "run", "run/checkpoints", "recipe.yaml", ""]),
        st.integers(-1, 3) | st.text(max_size=4),
    )
)
def test_random_train_arguments(values, tmp_path):
    resume, steps = values
    with workdir(tmp_path) as root:
        shutil.copy(RECIPES["stage2.yaml"], root / "recipe.yaml")
        args = ["train", "recipe.yaml", "--dry-run", "--resume", resume, "--set", f"train.steps={steps}"]
        invoke(args, root, outputs=[])


# -- checkpoint files -----------------------------------------------------------------------------------------------


class _RunsCode:
    """Unpickling this calls ``os.system``: what a malicious checkpoint does."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Evals:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({self.marker!r}, 'w')",))


def _official(assets: Path) -> dict:
    from pixart_cli.checkpoints.convert import ours_to_official
    from pixart_cli.checkpoints.format import load_checkpoint

    checkpoint = load_checkpoint(assets / "model")
    return {"state_dict": ours_to_official(checkpoint.state_dict, checkpoint.config)}


@st.composite
def broken_checkpoint(draw) -> tuple[str, object]:
    """(kind, detail): how to break a checkpoint; ``make_broken`` applies it."""
    kind = draw(
        st.sampled_from(
            [
                "truncate-weights", "corrupt-weights", "drop-key", "extra-key", "reshape", "dtype", "config",
                "delete-file", "truncate-pth", "pickle-code", "pickle-eval", "torch-code", "pth-object", "pth-values",
                "pth-reshape", "diffusers-config", "diffusers-json", "diffusers-truncate", "config-bytes",
            ]
        )
    )  # fmt: skip
    if kind in ("truncate-weights", "truncate-pth", "diffusers-truncate"):
        return kind, draw(st.floats(0.0, 0.999))
    if kind in ("config-bytes", "diffusers-json"):
        return kind, draw(st.binary(max_size=64) | VALUES.map(lambda v: json.dumps(v).encode()))
    if kind == "corrupt-weights":
        return kind, (draw(st.integers(0, 400)), draw(st.binary(min_size=1, max_size=16)))
    if kind in ("drop-key", "extra-key", "reshape", "dtype", "pth-reshape"):
        return kind, (draw(st.integers(0, 10**6)), draw(st.sampled_from(["int64", "bool", "complex64", "uint8"])))
    if kind in ("config", "diffusers-config"):
        return kind, (draw(st.integers(0, 10**6)), draw(VALUES), draw(st.sampled_from(["set", "delete"])))
    if kind == "delete-file":
        return kind, draw(st.sampled_from(["config.yaml", "model.safetensors"]))
    if kind == "pth-object":
        return kind, draw(VALUES)
    if kind == "pth-values":
        return kind, draw(st.sampled_from(["text", "list", "none", "nested"]))
    return kind, None


def make_broken(kind: str, detail: object, assets: Path, root: Path) -> str:
    """Write the broken checkpoint under ``root``; returns its path relative to ``root``."""
    model = root / "ckpt"
    if kind in ("truncate-pth", "pickle-code", "pickle-eval", "torch-code", "pth-object", "pth-values", "pth-reshape"):
        path = root / "ckpt.pth"
        official = _official(assets)
        if kind == "truncate-pth":
            buffer = io.BytesIO()
            torch.save(official, buffer)
            data = buffer.getvalue()
            path.write_bytes(data[: int(len(data) * detail)])
        elif kind == "pickle-code":
            path.write_bytes(pickle.dumps(_RunsCode(str(root / "PWNED"))))
        elif kind == "pickle-eval":
            path.write_bytes(pickle.dumps(_Evals(str(root / "PWNED"))))
        elif kind == "torch-code":
            torch.save({"state_dict": official["state_dict"], "hook": _RunsCode(str(root / "PWNED"))}, path)
        elif kind == "pth-object":
            torch.save(detail, path)
        elif kind == "pth-values":
            sd = dict(official["state_dict"])
            key = sorted(sd)[3]
            sd[key] = {"text": "abc", "list": [1, 2], "none": None, "nested": {"a": torch.zeros(2)}}[detail]
            torch.save({"state_dict": sd}, path)
        else:
            sd = dict(official["state_dict"])
            seed, _ = detail
            key = sorted(sd)[seed % len(sd)]
            sd[key] = sd[key].reshape(-1)[:-1] if sd[key].numel() > 1 else torch.zeros(3)
            torch.save({"state_dict": sd}, path)
        return "ckpt.pth"
    if kind.startswith("diffusers"):
        from pixart_cli.checkpoints.convert import write_diffusers
        from pixart_cli.checkpoints.format import load_checkpoint

        write_diffusers(load_checkpoint(assets / "model"), root / "hf")
        config_file = root / "hf" / "config.json"
        if kind == "diffusers-json":
            config_file.write_bytes(detail)
        elif kind == "diffusers-truncate":
            weights = root / "hf" / "diffusion_pytorch_model.safetensors"
            weights.write_bytes(weights.read_bytes()[: int(weights.stat().st_size * detail)])
        else:
            config = json.loads(config_file.read_text())
            seed, value, action = detail
            key = sorted(config)[seed % len(config)]
            if action == "set":
                config[key] = value
            else:
                del config[key]
            config_file.write_text(json.dumps(config))
        return "hf"
    shutil.copytree(assets / "model", model)
    weights = model / "model.safetensors"
    if kind == "truncate-weights":
        data = weights.read_bytes()
        weights.write_bytes(data[: int(len(data) * detail)])
    elif kind == "corrupt-weights":
        offset, junk = detail
        data = bytearray(weights.read_bytes())
        data[offset : offset + len(junk)] = junk
        weights.write_bytes(bytes(data))
    elif kind in ("drop-key", "extra-key", "reshape", "dtype"):
        sd = load_file(weights)
        seed, dtype = detail
        key = sorted(sd)[seed % len(sd)]
        if kind == "drop-key":
            del sd[key]
        elif kind == "extra-key":
            sd[key + ".extra"] = torch.zeros(2)
        elif kind == "reshape":
            sd[key] = torch.zeros(sd[key].numel() + 1)
        else:
            sd[key] = sd[key].to(getattr(torch, dtype))
        save_file(sd, weights)
    elif kind == "config":
        config = yaml.safe_load((model / "config.yaml").read_text())
        seed, value, action = detail
        paths = _paths(config)
        path = paths[seed % len(paths)]
        parent = config
        for key in path[:-1]:
            parent = parent[key]
        if action == "set":
            parent[path[-1]] = value
        else:
            parent.pop(path[-1])
        (model / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    elif kind == "delete-file":
        (model / detail).unlink()
    elif kind == "config-bytes":
        (model / "config.yaml").write_bytes(detail)
    return "ckpt"


# Damage that no reader may accept (the other kinds may happen to leave a usable checkpoint: a changed provenance
# string, a flipped byte inside a weight).
MUST_FAIL = {
    "truncate-weights", "drop-key", "extra-key", "reshape", "dtype", "delete-file", "truncate-pth", "pickle-code",
    "pickle-eval", "torch-code", "pth-values", "pth-reshape", "diffusers-truncate",
}  # fmt: skip


@FUZZ
@given(broken=broken_checkpoint())
def test_broken_checkpoints_fail_cleanly_in_convert_and_sample(broken, assets, tmp_path):
    kind, detail = broken
    with workdir(tmp_path) as root:
        place(assets, root, ("t5",))
        source = make_broken(kind, detail, assets, root)
        codes = []
        for to in ("pixart", "diffusers"):
            convert = ["convert", source, "-o", f"out-{to}", "--to", to, "--num-heads", "2"]  # width 32: no family
            code, output = invoke(convert, root, outputs=[f"out-{to}"])
            assert code == 0 or not (root / f"out-{to}").exists(), output  # a failure writes nothing
            codes.append(code)
        sample = ["sample", "a red circle", "-n", "1", "--model", source, "--steps", "1", "--t5", "t5"]
        code, output = invoke([*sample, "--vae", "none", "-o", "samples"], root, outputs=["samples"])
        assert code == 0 or not (root / "samples").exists(), output
        codes.append(code)
        assert not (root / "PWNED").exists()  # the pickle's code never ran
        if kind in MUST_FAIL:
            assert codes == [2, 2, 2], (kind, codes)
        if kind in ("pickle-code", "pickle-eval", "torch-code"):
            assert "refusing to load: this pickle would run code" in output, output


def test_a_zip_checkpoint_with_a_code_running_pickle_is_refused(tmp_path):
    """torch's zip format, its data.pkl replaced by a pickle that calls os.system: refused, never run."""
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(2)}}, path)
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    pkl = next(name for name in members if name.endswith("data.pkl"))
    members[pkl] = pickle.dumps(_RunsCode(str(tmp_path / "PWNED")), protocol=2)
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    result = runner.invoke(app, ["convert", str(path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "refusing to load: this pickle would run code (posix.system)" in result.output
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "out").exists()
