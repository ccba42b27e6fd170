"""`pixart serve`: a local web page (Gradio) for sampling over the same ``Pipeline`` as `pixart sample`.

``studio`` is the library (requests, one generation at a time, history in the output folder); ``web`` the page.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Callable

from pixart_cli.serve.studio import GenerationRequest, ServeSettings, Studio, load_pipeline

__all__ = ["GenerationRequest", "ServeSettings", "Studio", "load_pipeline", "serve"]


def serve(settings: ServeSettings, on_ready: Callable[[str], None] | None = None) -> None:
    """Load the model, hold the output folder (one server per folder) and serve until interrupted."""
    from pixart_cli.io import exclusive_output
    from pixart_cli.serve.web import gradio_or_error, launch

    gradio_or_error()  # before the model loads: a missing extra is one line, at once

    with exclusive_output(settings.output, "serve", label="-o"):
        # Gradio copies what it serves into a cache of its own: a private folder, outside the one it may serve
        # (so nothing uploaded to Gradio is ever served from there), removed when the server stops.
        cache = tempfile.mkdtemp(prefix="pixart-serve-")
        os.environ["GRADIO_TEMP_DIR"] = cache
        try:
            studio = Studio(settings, functools.partial(load_pipeline, settings))
            studio.pipeline(None)  # the model loads once, before the page is served
            launch(studio, on_ready)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
