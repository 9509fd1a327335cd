"""splitsense's data package: the real sensor datasets, the trained weights and their catalogs.

A distribution of its own (splitsense-assets, this folder's pyproject.toml) so that a device
installs ``splitsense[edge]`` without them: the device runs the exported fronts (``splitsense
models export``) and replays a recording only when asked to (``splitsense edge run --recording``).
The cloud, the simulator, training and export read them from here (``splitsense.config.assets_root``
finds this package, installed or in a checkout). Licences differ per dataset: see data/README.md.

    data/       the datasets (data/README.md: sources, citations, licences, what was changed)
    weights/    {model}.safetensors, {model}.teacher.safetensors, {model}.catalog.json;
                weights/export/ is where ``splitsense models export`` writes by default (not shipped)
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DATA_DIR", "ROOT", "WEIGHTS_DIR"]

ROOT = Path(__file__).resolve().parent
DATA_DIR = ROOT / "data"
WEIGHTS_DIR = ROOT / "weights"
