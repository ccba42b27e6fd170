"""`pixart serve` as a real process on the shipped demo: the JSON API, hostile input, files outside the output
folder, 20 concurrent requests, a kill mid-generation, and the refusals that are one `error:` line."""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from pixart_cli.io import png_is_complete
from pixart_cli.serve.studio import ServeSettings, Studio
from pixart_cli.shapesworld.demo import SHAPES_DEMO
from tests.serve.conftest import Server, start_server


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def read_manifest_lines(output: Path) -> list[str]:
    return [line for m in output.glob("*/manifest.jsonl") for line in m.read_text().splitlines()]


def check_folder(folder: Path) -> int:
    """Every image of a request folder is a complete PNG with a manifest record; returns how many."""
    records = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    names = sorted(p.name for p in folder.glob("*.png"))
    assert sorted(r["file"] for r in records) == names
    assert not [p for p in folder.iterdir() if ".tmp" in p.name]
    for name in names:
        assert png_is_complete(folder / name)
        Image.open(folder / name).load()
    return len(names)


def test_the_api_generates_into_a_folder_of_the_output(server: Server):
    event, result = server.call({"prompts": "a red circle", "num_images": 2, "steps": 3, "seed": 5})
    assert event == "complete", result
    folder = Path(result["folder"])
    assert folder.parent == server.output and check_folder(folder) == 2
    assert [r["seed"] for r in result["images"]] == [5, 6]
    assert result["images"][0]["caption"] != "a red circle"  # the demo's prompt completion, recorded
    assert result["command"].startswith("pixart sample -m builtin:shapes-demo -n 2 --seed 5")


def test_hostile_input_is_refused_with_a_message_and_the_server_keeps_serving(server: Server):
    api = f"{server.url}gradio_api/call/generate"
    malformed = httpx.post(api, content=b'{"data": [{"prompts": ', headers={"content-type": "application/json"})
    assert malformed.status_code == 422 and "JSON" in malformed.text
    binary = httpx.post(api, content=b"\xff\xfe\x00binary", headers={"content-type": "application/json"})
    assert binary.status_code in (400, 422)
    for fields, needle in [
        ({"prompts": "a", "steps": 10**9}, "steps must be in [1, 1000]"),
        ({"prompts": "a", "num_images": 10**6}, "1 to 8 images"),
        ({"prompts": "a", "width": 10**7, "height": 10**7}, "width must be"),
        ({"prompts": "a", "output": "../../etc"}, "unknown field 'output'"),
        ({"prompts": "a", "lora": "../../../etc/passwd"}, "not one of this server's adapters"),
        ({"prompts": "a\ud800"}, "not valid Unicode"),
        ("a red circle", "a request is a JSON object"),
    ]:
        event, message = server.call(fields)
        assert event == "error" and needle in message, (fields, event, message)
    # Files outside the output folder are not served, however the path is spelled; one inside is.
    secret = server.output.parent / "secret.txt"
    secret.write_text("not for the web")
    for path in ("/etc/passwd", secret, f"{server.output}/../secret.txt", f"{server.output}/%2e%2e/secret.txt"):
        answer = httpx.get(f"{server.url}gradio_api/file={path}")
        assert answer.status_code in (403, 404) and "not for the web" not in answer.text, path
    event, result = server.call({"prompts": "a blue square", "steps": 2})
    assert event == "complete" and check_folder(Path(result["folder"])) == 1


def test_twenty_concurrent_requests_are_all_answered_in_bounded_time_and_memory(server: Server):
    before = {p.name for p in server.output.iterdir()}
    rss = rss_mib(server.process.pid)
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda i: server.call({"prompts": f"a red circle {i}", "steps": 8, "seed": i}),
                                range(20)))  # fmt: skip
    assert time.monotonic() - started < 240
    done = [a for a in answers if a[0] == "complete"]
    refused = [a for a in answers if a[0] == "refused"]
    assert len(done) + len(refused) == 20 and done, answers
    assert all("Queue is full" in why for _, why in refused)
    new = sorted(p for p in server.output.iterdir() if p.name not in before and not p.name.startswith("."))
    assert len(new) == len(done) and sum(check_folder(f) for f in new) == len(done)
    # One generation at a time: each request's writing window (request.json to its last manifest line) ends before
    # the next one's begins.
    windows = sorted(((f / "request.json").stat().st_mtime, (f / "manifest.jsonl").stat().st_mtime) for f in new)
    assert all(end <= next_start for (_, end), (next_start, _) in itertools.pairwise(windows)), windows
    assert rss_mib(server.process.pid) < rss + 300  # bounded: the queue, not the callers, sets the work in flight


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_a_server_stopped_mid_generation_keeps_every_finished_image(signum, tmp_path):
    output = tmp_path / "out"
    server = start_server(output)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(server.call, {"prompts": "a red circle", "num_images": 8, "steps": 60}, 300)
            deadline = time.monotonic() + 180  # stopped once the first batch of 4 is written and recorded
            while time.monotonic() < deadline and len(read_manifest_lines(output)) < 4:
                time.sleep(0.05)
            server.process.send_signal(signum)
            server.process.wait(60)  # SIGTERM: the request stops at its next solver step, then the server exits
            assert pending.exception() is not None or pending.result()[0] in ("closed", "error")
    finally:
        if server.process.poll() is None:
            server.process.kill()
    if signum == signal.SIGTERM:
        stderr = server.process.stderr.read()
        assert server.process.returncode == 130 and "Traceback" not in stderr and "terminate" not in stderr, stderr
    (folder,) = [p for p in output.iterdir() if not p.name.startswith(".")]
    kept = check_folder(folder)
    assert 4 <= kept < 8  # the first batch of 4 was written; the second never finished
    # A restart shows them (the page's history is this list).
    studio = Studio(ServeSettings(model=SHAPES_DEMO, output=output), lambda adapter: None)
    assert len(studio.history()) == kept


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pixart_cli", *args], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "NO_COLOR": "1"})  # fmt: skip


def one_error_line(done: subprocess.CompletedProcess, needle: str) -> None:
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in done.stderr, done.stderr


def test_a_second_server_on_the_same_output_or_port_is_one_error_line(server: Server, tmp_path):
    one_error_line(cli("serve", "-o", str(server.output), "--port", "0"), "is in use by another")
    port = server.url.rstrip("/").rsplit(":", 1)[1]
    one_error_line(cli("serve", "-o", str(tmp_path / "other"), "--port", port), "pick another --port")
    one_error_line(cli("serve", "--port", "99999"), "--port must be")


def test_without_gradio_serve_says_how_to_install_it(tmp_path):
    code = ("import sys; sys.modules['gradio'] = None; sys.argv = ['pixart', 'serve', '-o', sys.argv[1]]; "
            "from pixart_cli.cli import main; main()")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    one_error_line(done, 'pip install "pixart-cli[app]"')
