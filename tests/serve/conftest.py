"""A real `pixart serve` process on the shipped demo, shared by the server and browser tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason='pixart serve needs the app extra: pip install -e ".[app]"')


@dataclass
class Server:
    url: str
    output: Path
    process: subprocess.Popen

    def call(self, fields: object, timeout: float = 120) -> tuple[str, object]:
        """One API request (Gradio's HTTP route): ("complete", result) or ("error", message) / ("refused", why)."""
        import httpx

        api = f"{self.url}gradio_api/call/generate"
        body = json.dumps({"data": [fields]}).encode()  # ASCII escapes: a lone surrogate travels as JSON allows
        posted = httpx.post(api, content=body, headers={"content-type": "application/json"}, timeout=timeout)
        body = posted.json()
        if "event_id" not in body:
            return "refused", body.get("detail")
        event = None
        with httpx.stream("GET", f"{api}/{body['event_id']}", timeout=timeout) as stream:
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    event = line.removeprefix("event: ")
                elif line.startswith("data: ") and event in ("complete", "error"):
                    data = json.loads(line.removeprefix("data: "))
                    return event, (data[0] if event == "complete" else data and data.get("error"))
        return "closed", None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(output: Path, *args: str, timeout: float = 180) -> Server:
    """`pixart serve` in a process of its own, once it has said its URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "pixart_cli", "serve", "-o", str(output), "--port", str(free_port()), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "NO_COLOR": "1"},
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    line = ""
    while time.monotonic() < deadline and process.poll() is None:
        line = process.stdout.readline()
        if line.startswith("serving "):
            return Server(line.split(" at ")[1].split(" ")[0], output, process)
    process.kill()
    raise RuntimeError(f"pixart serve did not start: {line}{process.stderr.read()}")


def stop_server(server: Server) -> None:
    server.process.send_signal(signal.SIGTERM)
    try:
        server.process.wait(30)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Iterator[Server]:
    running = start_server(tmp_path_factory.mktemp("serve") / "out", "--queue-size", "4", "--max-images", "8")
    yield running
    stop_server(running)
