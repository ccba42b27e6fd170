"""`pixart serve`: a local web page for sampling; images and manifests go to the output folder as `pixart sample`
writes them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pixart_cli.cli.common import app, console, fails_cleanly, library_logging, out, quiet_hub_libraries, resolve_device
from pixart_cli.errors import PixartError


@app.command()
@fails_cleanly
def serve(
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Any model pixart sample accepts (default: the bundled demo)."),
    ] = None,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on (0.0.0.0 makes it reachable from other machines).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port (0: the first free one from 7860).")] = 7860,
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Output folder: one subfolder per request, as pixart sample writes.")
    ] = Path("serve-outputs"),
    lora: Annotated[
        list[str] | None,
        typer.Option("--lora", help="An adapter the page may pick (DIR or DIR:SCALE); repeat to offer several."),
    ] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1 … (default: cuda if any).")] = None,
    t5: Annotated[str | None, typer.Option("--t5", help="T5 directory or hub id (overrides the checkpoint's).")] = None,
    vae: Annotated[str | None, typer.Option("--vae", help="AutoencoderKL directory or hub id, or 'none'.")] = None,
    max_images: Annotated[int, typer.Option("--max-images", help="Images a request may ask for.")] = 16,
    queue_size: Annotated[int, typer.Option("--queue-size", help="Requests that may wait; more are refused.")] = 8,
) -> None:
    """Serve a web page for sampling (Gradio): prompts, sampler, steps, CFG, seed, size, a gallery and history.

    One generation at a time. Each request is written to a folder of its own under --output, as pixart sample writes.

    The page shows, for every image, the pixart sample command that gives the same pixels.
    """
    from pixart_cli.adapters.format import parse_adapter_arg
    from pixart_cli.sampling.pipeline import default_model
    from pixart_cli.serve import ServeSettings
    from pixart_cli.serve import serve as run_server
    from pixart_cli.serve.web import gradio_or_error

    def absolute(path: str | None) -> str | None:  # the reproduce command then runs from any directory
        return str(Path(path).resolve()) if path and Path(path).exists() else path

    adapters = tuple((absolute(p), scale) for p, scale in (parse_adapter_arg(text) for text in lora or []))
    model = absolute(model or default_model())
    if model is None:
        raise PixartError("no model given: pass --model (anything pixart sample accepts)")
    settings = ServeSettings(
        model=model, output=output.resolve(), host=host, port=port, adapters=adapters,
        device=str(resolve_device(device)), t5=absolute(t5), vae=absolute(vae), max_images=max_images,
        queue_size=queue_size,
    )  # fmt: skip
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning:[/] listening on {host}: anyone who can reach this machine can use the page")

    def ready(url: str) -> None:
        out.print(f"serving {model} at {url} (images in {output}); Ctrl+C stops", soft_wrap=True, highlight=False)

    gradio_or_error()  # a missing extra is one line, before anything loads
    quiet_hub_libraries()
    console.print(f"loading {model}", highlight=False)
    with library_logging():
        run_server(settings, on_ready=ready)
