"""The broker's side of the plan store: follow it, serve every new plan set.

A broker in its own process (`splitsense cloud up`) or inside CloudStack runs one PlanSubscriber
(built by cloud.wiring.follow_plans). On a Redis outage the broker keeps serving its last plan;
on reconnection the store's watch re-reads the current plan, so the broker catches up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from cloud.broker import Broker
from cloud.planstore import PlanStore
from splitsense.errors import PlanError
from splitsense.plan import PlanSet

__all__ = ["PlanSubscriber"]

log = logging.getLogger(__name__)


class PlanSubscriber:
    """Follows the plan store and serves every new plan set from the broker (which pushes it to
    its WatchPlan streams). Never raises for an outage: the store's watch retries with back-off."""

    def __init__(
        self,
        store: PlanStore,
        broker: Broker,
        *,
        poll_s: float = 1.0,
        retry_initial_s: float = 0.1,
        retry_max_s: float = 5.0,
    ) -> None:
        self.store = store
        self.broker = broker
        self.poll_s = poll_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.applied: list[int] = []  # versions handed to the broker
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="plan-subscriber")

    async def run(self) -> None:
        """Until cancelled: every plan set newer than the broker's goes to `broker.set_plans`."""
        while True:
            try:
                async for plan_set in self.store.watch(
                    since_version=self.broker.plans.version,
                    poll_s=self.poll_s,
                    retry_initial_s=self.retry_initial_s,
                    retry_max_s=self.retry_max_s,
                ):
                    self._apply(plan_set)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in the watch: say so, start it again after a pause
                log.exception("plan subscriber: the store watch failed; restarting it")
                await asyncio.sleep(self.retry_max_s)

    def _apply(self, plan_set: PlanSet) -> None:
        try:
            if self.broker.set_plans(plan_set):
                self.applied.append(plan_set.version)
                log.info("broker serves plan set v%d from the plan store", plan_set.version)
        except PlanError as e:
            log.error("plan subscriber: refused plan set v%d: %s", plan_set.version, e)

    async def stop(self, timeout_s: float = 5.0) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                done, _ = await asyncio.wait({task}, timeout=timeout_s)
                if not done:
                    log.warning("plan subscriber did not stop within %.0f s; leaving it behind", timeout_s)
