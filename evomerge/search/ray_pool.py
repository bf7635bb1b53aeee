"""``executor.kind: ray``: a pool of Ray workers, each an actor holding one resident evaluator.

Each worker builds its own :class:`~evomerge.search.context.SearchContext` from the run's
config (models, merge engine, tasks, evaluator on its own CPUs / GPU) and answers whole jobs:
an adaptive test runs all its rounds inside the worker. After the banks are fitted the driver
sends them (and the anchors) to every worker (:meth:`RayExecutor.sync`).

The driver dispatches one job per idle worker and collects results as they complete; it — not
the workers — writes them to the run's logs. Faults:

- a worker whose process dies (killed, out of memory, a crash) fails its job with a Ray actor
  error: the job goes back to the front of the queue, and a replacement worker is started
  while ``executor.max_restarts`` allows; a result is delivered at most once per job (nothing
  is logged twice), and nothing that arrived is lost (it is already in the log);
- a job running longer than ``executor.timeout_s`` is taken for a hung worker: the worker is
  killed (``ray.kill``) and treated as dead;
- with every worker gone and no restarts left, the run stops with an :class:`EvomergeError`
  that says so; ``evomerge search --resume`` continues it later (only the jobs not in the log
  are dispatched again).

``executor.address`` joins a running cluster (``ray start --head`` on one node,
``ray start --address=HEAD:6379`` on the others); without it a local Ray is started for the run
and shut down at its end.
"""

from __future__ import annotations

import os
import time
from collections import deque

from evomerge.config import parse_config
from evomerge.errors import EvomergeError
from evomerge.search.context import build_context
from evomerge.search.executor import run_job

#: seconds between checks for hung jobs while waiting for results
POLL_S = 0.5


class _Worker:
    """The actor: one resident evaluator and the run's tasks (built in the worker process)."""

    def __init__(self, cfg_dict: dict, cwd: str | None, env: dict):
        os.environ.update(env)
        if cwd and os.path.isdir(cwd):
            os.chdir(cwd)  # relative task / model paths in the config resolve as on the driver
        self.ctx = build_context(parse_config(cfg_dict), None, log=lambda *_: None)

    def pid(self) -> int:
        return os.getpid()

    def sync(self, state: dict) -> bool:
        self.ctx.banks, self.ctx.anchors = state["banks"], state["anchors"]
        self.ctx.anchor_positions = state["anchor_positions"]
        return True

    def run(self, job) -> tuple[dict, float]:
        if os.environ.get("EVOMERGE_FAULT_HANG") == job.kind:  # fault injection for the tests: a hung job
            time.sleep(3600)
        t0 = time.perf_counter()
        res = run_job(self.ctx, job)
        return res, time.perf_counter() - t0

    def close(self) -> bool:
        self.ctx.evaluator.close()
        return True


def _import_ray():
    try:
        import ray
    except ImportError:
        raise EvomergeError("executor.kind: ray needs Ray: pip install 'evomerge[ray]' (or pip install ray), "
                            "or set executor.kind: local") from None
    return ray


class RayExecutor:
    """See the module docstring. ``log`` gets one line per worker started or lost."""

    def __init__(self, cfg, log=print):
        ray = self.ray = _import_ray()
        ex = cfg.executor
        self.ex, self.log = ex, log
        self.own_ray = not ray.is_initialized()
        if self.own_ray:
            kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            if ex.address:
                ray.init(address=ex.address, **kwargs)
            else:
                # enough logical CPUs for the pool even on a small machine (the driver mostly waits)
                need = int(max(os.cpu_count() or 1, ex.workers * ex.cpus_per_worker + 1))
                ray.init(num_cpus=need, object_store_memory=256 * 2**20, **kwargs)
        self.actor_cls = ray.remote(num_cpus=ex.cpus_per_worker, num_gpus=ex.gpus_per_worker,
                                    max_restarts=0, max_task_retries=0)(_Worker)
        self.cfg_dict, self.cwd = cfg.to_dict(), os.getcwd()
        self.state: dict | None = None
        self.restarts_left = ex.max_restarts
        self.busy_s, self.jobs, self.next_id = 0.0, 0, 0
        self.actors: dict[int, object] = {}
        self.pids: dict[int, int] = {}
        for _ in range(ex.workers):
            self._spawn()
        # wait for the workers to load their models (an error in the config or the models shows here)
        for wid, actor in list(self.actors.items()):
            try:
                self.pids[wid] = ray.get(actor.pid.remote())
            except ray.exceptions.RayActorError as exc:
                self.close()
                raise EvomergeError(f"executor: Ray worker {wid} failed to start: {_cause(exc)}") from None
        log(f"executor: ray, {len(self.actors)} workers ({ex.cpus_per_worker:g} CPU, {ex.gpus_per_worker:g} GPU "
            f"each; pids {', '.join(str(self.pids[w]) for w in sorted(self.pids))})")

    @property
    def workers(self) -> int:
        return len(self.actors)

    def _spawn(self) -> int:
        wid = self.next_id
        self.next_id += 1
        env = {k: v for k, v in os.environ.items() if k.startswith("EVOMERGE_")}  # the zoo's cache, ...
        actor = self.actor_cls.remote(self.cfg_dict, self.cwd, env)
        if self.state is not None:
            actor.sync.remote(self.state)  # an actor runs its calls in order: before any job
        self.actors[wid] = actor
        return wid

    def _lose(self, wid: int, why: str) -> None:
        actor = self.actors.pop(wid, None)
        self.pids.pop(wid, None)
        if actor is not None:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:  # already dead
                pass
        if self.restarts_left > 0:
            self.restarts_left -= 1
            new = self._spawn()
            self.log(f"  worker {wid} lost ({why}); started worker {new} in its place "
                     f"({self.restarts_left} restarts left)")
        else:
            self.log(f"  worker {wid} lost ({why}); no restarts left, {len(self.actors)} workers remain")

    def sync(self, ctx) -> None:
        self.state = {"banks": ctx.banks, "anchors": ctx.anchors, "anchor_positions": ctx.anchor_positions}
        ref = self.ray.put(self.state)
        pending = {wid: a.sync.remote(ref) for wid, a in self.actors.items()}
        for wid, r in pending.items():
            try:
                self.ray.get(r)
            except self.ray.exceptions.RayActorError as exc:  # its replacement gets the state at start
                self._lose(wid, f"its process died: {type(exc).__name__}")

    def map(self, ctx, jobs, on_result=None) -> list[dict]:
        ray = self.ray
        results: list = [None] * len(jobs)
        delivered = [False] * len(jobs)
        queue = deque(range(len(jobs)))
        inflight: dict = {}  # ref -> (worker id, job position, start time)
        while queue or inflight:
            busy = {w for w, _, _ in inflight.values()}
            idle = deque(sorted(w for w in self.actors if w not in busy))
            while queue and idle:
                wid, i = idle.popleft(), queue.popleft()
                inflight[self.actors[wid].run.remote(jobs[i])] = (wid, i, time.monotonic())
            if not inflight:
                raise EvomergeError(
                    f"executor: all Ray workers are gone ({self.ex.workers} started, "
                    f"{self.ex.max_restarts} restarts used); every result that arrived is in the run's log. "
                    "Resume the run later with `evomerge search --resume RUN_DIR` (only the missing jobs "
                    "are dispatched again), with more executor.max_restarts or executor.kind: local")
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=POLL_S)
            for ref in ready:
                wid, i, _ = inflight.pop(ref)
                try:
                    res, seconds = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    queue.appendleft(i)  # re-dispatched to another (or a new) worker
                    self._lose(wid, f"its process died: {type(exc).__name__}")
                    continue
                except ray.exceptions.RayTaskError as exc:
                    raise _cause(exc) from None
                self.busy_s += seconds
                self.jobs += 1
                if delivered[i]:
                    continue  # at most once per job, whatever happens
                delivered[i], results[i] = True, res
                if on_result is not None:
                    on_result(jobs[i], res)
            if self.ex.timeout_s is not None:
                now = time.monotonic()
                for ref, (wid, i, t0) in list(inflight.items()):
                    if now - t0 > self.ex.timeout_s:
                        del inflight[ref]
                        queue.appendleft(i)
                        self._lose(wid, f"no result after {self.ex.timeout_s:g}s on job {jobs[i].kind} "
                                        f"{jobs[i].key}")
        return results

    def stats(self) -> dict:
        return {"workers": len(self.actors), "busy_s": self.busy_s, "jobs": self.jobs}

    def close(self) -> None:
        for actor in self.actors.values():
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self.actors.clear()
        if self.own_ray and self.ray.is_initialized():
            self.ray.shutdown()


def _cause(exc):
    """The worker's own exception inside a Ray error (an EvomergeError stays one)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return cause
    return EvomergeError(f"executor: a Ray worker failed: {exc}")
