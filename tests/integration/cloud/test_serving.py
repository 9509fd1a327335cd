"""Ray Serve tails with real Ray: same logits as in-process, a killed replica fails fast and
recovers. One Ray for the whole session (tests/integration/conftest.py)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from cloud.backend import TailUnavailableError, run_tail_sync
from cloud.serving import RayTailBackend, replica_actor_names, start_serving, stop_serving
from pipelines.training import TrainedModel, held_out_set, load_trained
from splitsense.config import ServingConfig
from splitsense.errors import ModelError

pytestmark = pytest.mark.integration

MODEL = "uci_har"  # the smallest shipped model: the quickest replica to start
TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def trained() -> TrainedModel:
    return load_trained(MODEL)


@pytest.fixture(scope="module")
def tails(ray_cluster: str) -> Iterator[RayTailBackend]:
    backend = start_serving(ServingConfig(models=(MODEL,), request_timeout_s=TIMEOUT_S))
    yield backend
    stop_serving()


async def test_ray_logits_equal_in_process_logits_at_every_cut(tails: RayTailBackend, trained: TrainedModel) -> None:
    m = trained.model
    x, _ = held_out_set(trained)
    x = x[:16]
    for cut in range(m.n_stages):
        with torch.inference_mode():
            activation = m.run(x, 0, cut).numpy()
        expected = run_tail_sync(m, cut, activation)
        got = await tails.run_tail(MODEL, cut, activation)
        assert got.shape == (16, m.num_classes)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=f"cut {cut}")
        assert (got.argmax(1) == expected.argmax(1)).all()


async def test_unknown_model_and_misshapen_batch_are_model_errors(tails: RayTailBackend) -> None:
    with pytest.raises(ModelError, match="unknown model"):
        await tails.run_tail("no_such_model", 1, np.zeros((1, 4), np.float32))
    # The replica refuses it; the error comes back as ours, not as a Ray traceback.
    with pytest.raises(ModelError, match="expected a batch of shape"):
        await tails.run_tail(MODEL, 3, np.zeros((2, 5, 5), np.float32))


async def test_killed_replica_fails_within_the_timeout_then_recovers(
    tails: RayTailBackend, trained: TrainedModel, record_property: Callable[[str, object], None]
) -> None:
    import ray

    m = trained.model
    cut = m.n_stages - 2
    batch = np.zeros((1, *m.activation_shape(cut)), np.float32)
    await tails.run_tail(MODEL, cut, batch)  # healthy first
    (name,) = replica_actor_names(MODEL)
    actor = ray.get_actor(name, namespace="serve")
    killed_at = time.monotonic()
    ray.kill(actor, no_restart=True)
    for _ in range(50):  # ray.kill is asynchronous: wait until the process is really gone
        try:
            await asyncio.wait_for(actor.__ray_ready__.remote(), 0.2)
        except (ray.exceptions.RayActorError, TimeoutError):
            break
        await asyncio.sleep(0.1)

    # Over Serve's gRPC path (serving.handle_transport "grpc") the router may also retry the call
    # on the replica Serve starts: an answer in time is as good as a fast failure; a hang is not.
    started = time.monotonic()
    try:
        await tails.run_tail(MODEL, cut, batch)
        outcome = "answered"
    except TailUnavailableError:
        outcome = "TailUnavailableError"
    failed_after_s = time.monotonic() - started
    assert failed_after_s <= TIMEOUT_S + 0.5, "a dead replica must fail fast (or be replaced in time), not hang"

    recovered_s = None
    while time.monotonic() - killed_at < 30:
        try:
            out = await tails.run_tail(MODEL, cut, batch)
        except TailUnavailableError:
            await asyncio.sleep(0.2)
            continue
        recovered_s = time.monotonic() - killed_at
        assert out.shape == (1, m.num_classes)
        break
    assert recovered_s is not None, "Serve did not replace the killed replica within 30 s"
    assert replica_actor_names(MODEL) != [name]
    record_property("replica_recovery_s", round(recovered_s, 2))
    print(f"\nafter ray.kill: {outcome} in {failed_after_s:.2f} s, recovered in {recovered_s:.2f} s")


def test_serving_worker_niceness_reaches_the_workers_of_a_ray_started_here(tmp_path: Path) -> None:
    """serving.worker_niceness 0 reaches Ray's workers (a fresh local Ray, in a process of its own;
    Ray's default would be 15)."""
    script = tmp_path / "nice.py"
    script.write_text(
        "import logging, os, ray\n"
        "from cloud.serving import ray_system_config\n"
        "from splitsense.config import ServingConfig\n"
        "ray.init(address='local', include_dashboard=False, logging_level=logging.ERROR,\n"
        "         **ray_system_config(ServingConfig(worker_niceness=0)))\n"
        "nice = ray.remote(lambda: os.nice(0))\n"
        "print('worker nice', ray.get(nice.remote()))\n"
        "ray.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert "worker nice 0" in out.stdout, out.stderr[-2000:]
