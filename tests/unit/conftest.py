"""Fixtures shared by unit tests of different packages."""

from __future__ import annotations

from pathlib import Path

import pytest

EXPORTED_MODEL = "uci_har"  # the smallest shipped model
EXPORTED_LEVEL = 0.98  # one compression level besides 1.0: every stage after the encoder is compressed
CHECK_WINDOWS = 64


@pytest.fixture(scope="session")
def uci_har_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """uci_har exported (levels 1.0 and 0.98, checked on 64 test windows) into a temporary root:
    the model's folder is `<root>/uci_har` (pipelines/export.py; ~30 s, once per session)."""
    from pipelines.export import export_model

    root = tmp_path_factory.mktemp("export")
    export_model(EXPORTED_MODEL, root / EXPORTED_MODEL, levels=[EXPORTED_LEVEL], check_windows=CHECK_WINDOWS)
    return root
