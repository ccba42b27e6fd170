"""Experiment trackers (``log.trackers``) through accelerate's tracking API: every metric the run writes to
``metrics.jsonl`` and ``validation.jsonl`` also goes to each tracker, at the same step.

- ``tensorboard``: event files under ``<output.dir>/tensorboard/<recipe name>`` (``tensorboard --logdir``).
- ``wandb``: a Weights & Biases run under ``<output.dir>/wandb``; ``log.wandb_mode: offline`` writes it with no
  network (``wandb sync`` uploads it later). Each launch of a run (a resume included) is one W&B run, grouped under
  the output folder's name, so nothing a resumed run re-logs collides with what it logged before it stopped.

The recipe (flattened to dotted keys) is recorded as each tracker's configuration.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pixart_cli.errors import PixartError
from pixart_cli.training.recipe import LogSection, Recipe

# tracker name → (module it needs, package to install)
_NEEDS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def check_trackers_available(log: LogSection) -> None:
    """Fail now, naming the package to install, rather than when training starts."""
    import importlib.util

    for name in log.trackers:
        module, package = _NEEDS[name]
        if importlib.util.find_spec(module) is None:
            raise PixartError(
                f"log.trackers: {name} needs the {package} package: pip install -e '.[trackers]' "
                f"(or pip install {package})"
            )


def accelerator_kwargs(recipe: Recipe) -> dict[str, Any]:
    """What ``Accelerator(...)`` needs to know about the trackers."""
    if not recipe.log.trackers:
        return {}
    from accelerate.utils import ProjectConfiguration

    output = Path(recipe.output.dir)
    return {
        "log_with": list(recipe.log.trackers),
        "project_config": ProjectConfiguration(project_dir=str(output), logging_dir=str(output / "tensorboard")),
    }


def start_trackers(acc: Any, recipe: Recipe, resolved: dict) -> None:
    """Open a run in each tracker, recording the recipe (main process; a no-op without trackers)."""
    if not recipe.log.trackers:
        return
    output = Path(recipe.output.dir).resolve()
    init_kwargs: dict[str, dict] = {}
    if "wandb" in recipe.log.trackers:
        (output / "wandb").mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_SILENT", "true")  # its banner would land among the run's own lines
        init_kwargs["wandb"] = {
            "dir": str(output),
            "mode": recipe.log.wandb_mode,
            "group": output.name,
            "name": recipe.name,
        }
    acc.init_trackers(recipe.name, config=flat_config(resolved), init_kwargs=init_kwargs)


def flat_config(resolved: dict, prefix: str = "") -> dict[str, bool | int | float | str]:
    """The resolved recipe as dotted keys with scalar values (what TensorBoard's hparams accept): lists and nulls
    as JSON text."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in resolved.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flat_config(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def finish_trackers(acc: Any) -> None:
    """Close every tracker's run, also when training stops on an error or a signal (what it logged is kept)."""
    for tracker in acc.trackers:
        tracker.finish()
    acc.trackers = []
