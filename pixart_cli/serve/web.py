"""The web page of `pixart serve` (Gradio), over a ``Studio``.

One queue for the page and the API: one generation runs at a time (``concurrency_id="device"``), at most
``ServeSettings.queue_size`` wait (Gradio shows each its position), more are refused as busy. The API is the page's
own (``/generate``: one JSON object, the fields of ``studio.FIELDS``; Gradio's client or its HTTP ``call`` route).
"""

import contextlib
import math
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from pixart_cli.errors import PixartError
from pixart_cli.sampling.solvers import DEFAULT_CFG, SAMPLERS
from pixart_cli.serve.studio import GenerationRequest, Studio, read_request

HISTORY = 200  # images shown from earlier requests
CSS = "#reproduce textarea {font-family: ui-monospace, monospace; font-size: 0.85em}"


def gradio_or_error():
    """Gradio, or one clear error saying how to install it (an optional extra)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local tool
    try:
        import gradio
    except ImportError:
        raise PixartError(
            'pixart serve needs Gradio: pip install -e ".[app]" (or pip install "pixart-cli[app]")'
        ) from None
    return gradio


def _label(record: dict) -> str:
    """A gallery caption: the prompt, what the model read where completion reworded it, the seed."""
    text = record.get("prompt", "")
    if record.get("caption"):
        text += f"  →  {record['caption']}"
    return f"{text}  (seed {record.get('seed')})"


def _entries(images: list[tuple[Path, dict]]) -> list[dict]:
    """What the page keeps per shown image: its file, its record and its request's reproduce command."""
    commands: dict[Path, str] = {}
    out = []
    for path, record in images:
        if path.parent not in commands:
            commands[path.parent] = read_request(path.parent).get("command", "")
        out.append({"file": str(path), "record": record, "command": commands[path.parent]})
    return out


def build_app(studio: Studio, title: str = "pixart"):
    """The Gradio Blocks app (not launched)."""
    gr = gradio_or_error()
    serve = studio.settings
    # Cancel flags by request token: a page's token (its gr.State) is made when Generate is clicked, so a cancel while
    # the request waits in the queue counts; Cancel sets it; it is dropped when the request ends.
    cancels: dict[str, threading.Event] = {}

    def arm() -> tuple[str, str]:
        token = uuid.uuid4().hex
        cancels[token] = threading.Event()
        return "waiting for the device…", token

    def generate(request: dict, progress=gr.Progress()) -> dict:
        """Generate images. ``request``: {"prompts": "...", "num_images": 2, "seed": 0, "steps": 20, ...}
        (see the docs for every field). Returns the folder, the files with their records, and the command that
        reproduces them."""
        return run_request(request, progress, uuid.uuid4().hex)

    def run_request(request: dict, progress, token: str) -> dict:
        event = cancels.setdefault(token, threading.Event())
        try:
            parsed = GenerationRequest.from_fields(request, serve)

            def step(done: float, total: int) -> None:
                progress(done / max(total, 1), desc=f"{done:.1f} of {total} images", unit="images")

            result = studio.generate(parsed, progress=step, cancel=event)
        except PixartError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        finally:
            cancels.pop(token, None)
        return {
            "folder": None if result.folder is None else str(result.folder),
            # "saved_to", not "path": Gradio's client takes a "path" key for a file to download
            "images": [{**record, "saved_to": str(p)} for p, record in result.images],
            "command": result.command,
            "cancelled": result.cancelled,
        }

    def page_generate(prompts, negative, sampler, steps, cfg, seed, random_seed, count, size, width, height, lora,
                      token, progress=gr.Progress()):  # fmt: skip
        def whole(value, name: str) -> int | None:  # the page's numbers: empty or 0 means the default
            if value is None or value == 0:
                return None
            if not math.isfinite(value) or value != int(value):
                raise gr.Error(f"{name}: a whole number, got {value}", print_exception=False)
            return int(value)

        if size and size != "model default" and not (width or height):
            width, height = (int(v) for v in size.split("×"))
        fields: dict[str, Any] = {
            "prompts": prompts or "", "negative_prompt": negative or None, "sampler": sampler,
            "steps": whole(steps, "steps"), "cfg": float(cfg if cfg is not None else DEFAULT_CFG),
            "num_images": whole(count, "images per prompt") or 1,
            "seed": None if random_seed else whole(seed, "seed") or 0,
            "width": whole(width, "width"), "height": whole(height, "height"),
            "lora": lora if lora and lora != "none" else None,
        }  # fmt: skip
        done = run_request(fields, progress, token)
        gallery, entries = load_history()
        if done["folder"] is None:
            status = "cancelled before it started"
        else:
            shown = "cancelled: " if done["cancelled"] else ""
            status = f"{shown}{len(done['images'])} image(s) in `{done['folder']}`"
        first = done["images"][0] if done["images"] else None
        return gallery, entries, first, done["command"], status

    def cancel(token: str) -> str:
        event = cancels.get(token)
        if event is None:
            return "nothing to cancel"
        event.set()
        return "cancelling: a waiting request will not start; a running one stops after its current solver step"

    def load_history():
        entries = _entries(studio.history(HISTORY))
        return [(e["file"], _label(e["record"])) for e in entries], entries

    def select(entries: list[dict], evt: gr.SelectData):
        if not entries or evt.index is None or evt.index >= len(entries):
            return None, ""
        entry = entries[evt.index]
        return entry["record"], entry["command"]

    private = {"queue": False, "api_visibility": "private"}

    pipeline = studio.pipeline(None)
    default_h, default_w = pipeline.image_size()
    sizes = ["model default"]
    if pipeline.config.multi_scale:
        from pixart_cli.data.buckets import Buckets

        multiple = pipeline.autoencoder.downsample * pipeline.config.patch_size
        table = Buckets.for_resolution(default_h, True, multiple)
        sizes += [f"{w}×{h}" for h, w in table.sizes]
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"## {title}\nModel `{serve.model}` · {default_w}×{default_h} px · images go to `{serve.output}`")
        entries = gr.State([])
        with gr.Row():
            with gr.Column(scale=2):
                prompts = gr.Textbox(label="Prompts (one per line)", lines=3, elem_id="prompts",
                                     value="a red circle to the left of a blue square")  # fmt: skip
                negative = gr.Textbox(label="Negative prompt", elem_id="negative")
                with gr.Row():
                    sampler = gr.Dropdown(list(SAMPLERS), value="dpm-solver", label="Sampler", elem_id="sampler")
                    steps = gr.Number(value=0, label="Steps (0: the sampler's default)", precision=0, minimum=0,
                                      elem_id="steps")  # fmt: skip
                    cfg = gr.Number(value=DEFAULT_CFG, label="CFG", minimum=0, maximum=100, elem_id="cfg")
                with gr.Row():
                    seed = gr.Number(value=0, label="Seed", precision=0, minimum=0, elem_id="seed")
                    random_seed = gr.Checkbox(value=False, label="Random seed", elem_id="random-seed")
                    count = gr.Slider(1, serve.max_images, value=2, step=1, label="Images per prompt",
                                      elem_id="count")  # fmt: skip
                size = gr.Dropdown(sizes, value="model default", label="Size (aspect bucket)", elem_id="size")
                with gr.Accordion("Custom size", open=False), gr.Row():
                    width = gr.Number(value=None, label="Width", precision=0, elem_id="width")
                    height = gr.Number(value=None, label="Height", precision=0, elem_id="height")
                lora = gr.Dropdown(["none", *serve.adapter_names()], value="none", label="LoRA",
                                   visible=bool(serve.adapters), elem_id="lora")  # fmt: skip
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Cancel", elem_id="cancel")
                status = gr.Markdown(elem_id="status")
            with gr.Column(scale=3):
                gallery = gr.Gallery(label="Images (newest first)", columns=4, height="auto", elem_id="gallery",
                                     buttons=["download", "fullscreen"], type="filepath")  # fmt: skip
                details = gr.JSON(label="Settings of the selected image", elem_id="details")
                command = gr.Textbox(label="Reproduce (the same pixels with pixart sample)", elem_id="reproduce",
                                     lines=2, buttons=["copy"])  # fmt: skip
        inputs = [prompts, negative, sampler, steps, cfg, seed, random_seed, count, size, width, height, lora]
        token = gr.State("")  # this page's latest request, for Cancel
        run.click(arm, None, [status, token], **private).then(
            page_generate, [*inputs, token], [gallery, entries, details, command, status],
            concurrency_id="device", concurrency_limit=1, api_visibility="private",
        )  # fmt: skip
        stop.click(cancel, token, status, **private)
        gallery.select(select, entries, [details, command], **private)
        app.load(load_history, None, [gallery, entries], **private)
        # The programmatic API: one JSON object in, one out (hidden from the page, listed under "Use via API").
        json_in, json_out = gr.JSON(visible=False), gr.JSON(visible=False)
        api_button = gr.Button(visible=False)
        api_button.click(generate, json_in, json_out, api_name="generate", concurrency_id="device",
                         concurrency_limit=1)  # fmt: skip
    app.queue(max_size=serve.queue_size, default_concurrency_limit=1)
    app.pixart_theme, app.pixart_css = theme, CSS  # launch() takes them in Gradio 6
    return app


def launch(studio: Studio, on_ready=None) -> None:
    """Serve until interrupted; ``on_ready(url)`` once the server listens."""
    app = build_app(studio)
    serve = studio.settings
    try:
        _, url, _ = app.launch(
            server_name=serve.host, server_port=serve.port or None, prevent_thread_lock=True, quiet=True,
            allowed_paths=[str(serve.output.resolve())], max_file_size="1mb", show_error=True, theme=app.pixart_theme,
            css=app.pixart_css, footer_links=["api"], ssr_mode=False,
        )  # fmt: skip
    except OSError as exc:  # the port is taken, or the address is not this machine's
        raise PixartError(f"cannot listen on {serve.host}:{serve.port} ({exc}); pick another --port") from None
    if on_ready is not None:
        on_ready(url)

    def stop(signum, frame):  # SIGTERM (a service manager, `kill`) stops it as Ctrl+C does
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        while True:  # Gradio's block_thread, without its own message
            time.sleep(0.2)
    finally:
        signal.signal(signal.SIGTERM, previous)
        studio.stop()  # the running request ends at its next solver step, its finished images kept
        with contextlib.redirect_stdout(sys.stderr):  # Gradio says "Closing server ...": a log line, not a result
            app.close()
