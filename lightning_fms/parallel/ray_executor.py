"""RayExecutor: a study's epochs on a Ray cluster, one long-lived worker (a Ray actor) per slot.

Each worker holds its own epoch executor (an :class:`~lightning_fms.training.in_process.InProcessExecutor`, given
as an instance that is pickled to the worker or as a callable that builds it there), so imports, data and hub
modules stay warm from one epoch to the next. The study directory stays the one source of truth: a worker reads
the job's resume checkpoint and writes its ``checkpoint_out`` itself, and only the small outcome (value, metrics,
error, time, and the weights when the job asks for them) travels back to the driver, which commits the epoch.

* ``address=None``: the Ray instance this process is already connected to, else a new local single-host cluster
  that listens on 127.0.0.1 only (stopped again by :meth:`RayExecutor.close`). ``"auto"`` or ``"HOST:PORT"``:
  attach to a running cluster (``ray start --head``; docs/ray.md).
* A worker killed mid-epoch comes back from :meth:`RayExecutor.wait` as :class:`~lightning_fms.parallel.protocol.
  Finished` with ``lost`` set; Ray restarts it (``max_restarts=-1``) and never re-runs the epoch itself
  (``max_task_retries=0``), so the driver alone decides what is trained again.
* Checkpoints must be on storage the driver sees. The driver writes a marker file with a token into the folder
  above each job's ``log_dir`` (the study's ``trials/``), and every worker checks it before its first epoch
  there: a node that does not share the study directory fails the study with one line instead of writing
  checkpoints nobody reads.

Ray is imported when a :class:`RayExecutor` is made; without it, one line says ``pip install 'lightning_fms[ray]'``.
"""

from __future__ import annotations

import ipaddress
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from lightning_fms.atomic import atomic_write_text
from lightning_fms.errors import FMSError, one_line
from lightning_fms.extras import import_optional
from lightning_fms.parallel.driver import DRIVER_MODES, REFIT_POLICIES
from lightning_fms.parallel.protocol import Finished
from lightning_fms.training.executor import EpochJob, EpochOutcome, Executor

__all__ = ["MODES", "SETTING_DEFAULTS", "STORAGE_MARKER", "RayExecutor", "check_ray_settings", "ray_settings"]

MODES: tuple[str, ...] = DRIVER_MODES
"""The driver's decision modes: ``async`` (decide whenever a worker frees) and ``sync`` (batches of ``workers``)."""
SETTING_DEFAULTS: dict[str, Any] = {
    "address": None,
    "workers": 1,
    "cpus_per_trial": 1.0,
    "gpus_per_trial": 0.0,
    "mode": "async",
    "refit": "auto",
}
"""The defaults of the settings a recipe's ``tuner.ray`` block, ``--ray.*`` and ``--tuner.ray.*`` give."""
STORAGE_MARKER = ".ray-storage"
"""The marker file the driver writes next to the trial folders; a worker must read the driver's token from it."""
LOOPBACK_ENVIRONMENT = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
"""Set (unless already set) before a local cluster starts: Ray's single-host mode keeps it on 127.0.0.1."""
_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_USER_SINGLE_HOST = os.environ.get(_SWITCH)
"""The user's own setting of Ray's single-host switch (``None``: the executor sets it per cluster address)."""
_LOST_RETRIES = 2
"""How many times :meth:`RayExecutor.run_epoch` trains an epoch again after its worker was lost."""


def check_ray_settings(
    address: str | None, workers: int, cpus_per_trial: float, gpus_per_trial: float, mode: str, refit: str = "auto"
) -> None:
    """Validate a Ray executor's settings (without importing Ray).

    Raises:
        FMSError: one line naming the bad setting.
    """
    if address is not None and (not isinstance(address, str) or not _address_ok(address)):
        raise FMSError(f"ray.address must be null (a local cluster), 'auto' or HOST:PORT, got {address!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise FMSError(f"ray.workers must be an integer >= 1, got {workers!r}")
    for name, value in (("cpus_per_trial", cpus_per_trial), ("gpus_per_trial", gpus_per_trial)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise FMSError(f"ray.{name} must be a number >= 0, got {value!r}")
    if gpus_per_trial > 1 and gpus_per_trial != int(gpus_per_trial):
        raise FMSError(f"ray.gpus_per_trial above 1 must be a whole number of GPUs, got {gpus_per_trial!r}")
    if mode not in MODES:
        raise FMSError(f"unknown ray.mode {mode!r} (expected one of {', '.join(MODES)})")
    if refit not in REFIT_POLICIES:
        raise FMSError(f"unknown ray.refit {refit!r} (expected one of {', '.join(REFIT_POLICIES)})")


def ray_settings(given: Mapping[str, Any]) -> dict[str, Any]:
    """A Ray executor's settings: ``given`` (e.g. a recipe's ``tuner.ray`` block) over the defaults, validated.

    Raises:
        FMSError: one line naming the bad setting.
    """
    settings = {**SETTING_DEFAULTS, **{key: value for key, value in given.items() if value is not None}}
    check_ray_settings(**settings)
    return settings


def _address_ok(address: str) -> bool:
    if address == "auto":
        return True
    host, _, port = address.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def _is_loopback(address: str | None) -> bool:
    if address is None:
        return True
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_executor(obj: object) -> bool:
    """An epoch executor instance (not a class, not a factory)."""
    return not isinstance(obj, type) and callable(getattr(obj, "run_epoch", None))


def _ray(single_host: bool) -> Any:
    """Ray, imported in single-host mode (everything on 127.0.0.1) when ``single_host``.

    Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, when it is imported (its processes read it from the
    environment they inherit): it is set here before the import, and Ray's copy of it is kept in step when Ray
    was imported already. A value the user set in the environment is left alone.
    """
    if _USER_SINGLE_HOST is None:
        if single_host:
            os.environ.update({k: v for k, v in LOOPBACK_ENVIRONMENT.items() if k not in os.environ or k == _SWITCH})
        else:
            os.environ.pop(_SWITCH, None)
    ray = import_optional("ray", "ray", "RayExecutor")
    if _USER_SINGLE_HOST is None:
        constants = sys.modules.get("ray._private.ray_constants")
        if constants is not None and hasattr(constants, "ENABLE_RAY_CLUSTER"):
            constants.ENABLE_RAY_CLUSTER = not single_host
    return ray


@dataclass
class _Slot:
    """One worker as the driver sees it."""

    index: int
    actor: Any
    ip: str = "?"
    pid: int | None = None
    busy: bool = False
    restarting: bool = False

    @property
    def label(self) -> str:
        return f"ray-w{self.index}@{self.ip}"


class EpochWorker:
    """The Ray actor of one slot: builds its epoch executor once and trains the epochs it is sent.

    Args:
        executor: The epoch executor, or a callable without arguments that builds it (called here, once), pickled
            by the driver (unpickled here once the driver's import path is in place).
        index: The slot's index (for its label).
        cwd: The driver's working directory: the worker works there when it exists on this node, so relative
            paths in a configuration mean what they mean to the driver.
        sys_path: The driver's import path: its folders that exist on this node are appended to the worker's,
            so the modules the driver's trials come from import here too.
        threads: torch's intra-op thread count on the worker.
    """

    def __init__(self, executor: bytes, index: int, cwd: str, sys_path: Sequence[str], threads: int) -> None:
        import torch

        if os.path.isdir(cwd):
            os.chdir(cwd)
        sys.path.extend(p for p in sys_path if p not in sys.path and os.path.isdir(p or "."))
        torch.set_num_threads(threads)
        self._spec = executor
        self._executor: Executor | None = None
        self._index = index
        self._verified: set[str] = set()

    def _build(self) -> Executor:
        if self._executor is None:
            from ray import cloudpickle

            try:
                spec = cloudpickle.loads(self._spec)
            except Exception as error:  # a module the driver imports that this node lacks, ...
                raise FMSError(
                    f"Ray worker {self._index} cannot load the epoch executor: {one_line(error, 200)}"
                ) from None
            self._executor = spec if _is_executor(spec) else spec()
        return self._executor  # type: ignore[return-value]

    def _identity(self) -> dict[str, Any]:
        import ray

        return {"ip": ray.util.get_node_ip_address(), "pid": os.getpid()}

    def ready(self) -> dict[str, Any]:
        """Build the executor (imports, trial builder); the worker's address, or the set-up error."""
        try:
            self._build()
        except FMSError as error:
            return {**self._identity(), "setup_error": one_line(error)}
        return self._identity()

    def _check_storage(self, job: EpochJob, token: str) -> None:
        root = job.log_dir.parent
        if str(root) in self._verified:
            return
        marker = root / STORAGE_MARKER
        where = f"Ray worker {self._index} on {self._identity()['ip']}"
        try:
            seen = marker.read_text().strip()
        except OSError:
            raise FMSError(
                f"{where} cannot see {root} (the study directory must be on storage shared by the driver and every "
                "node, see docs/ray.md)"
            ) from None
        if seen != token:
            raise FMSError(
                f"{where} sees another {root} than the driver (the study directory must be on storage shared by "
                "the driver and every node, see docs/ray.md)"
            )
        self._verified.add(str(root))

    def run(self, job: EpochJob, token: str) -> dict[str, Any]:
        """Train one epoch; a small dict: the outcome's fields and who ran it (or the set-up error)."""
        try:
            self._check_storage(job, token)
            outcome = self._build().run_epoch(job)
        except FMSError as error:
            return {**self._identity(), "setup_error": one_line(error)}
        return {
            **self._identity(),
            "value": outcome.value,
            "metrics": dict(outcome.metrics),
            "error": outcome.error,
            "wall_s": outcome.wall_s,
            "weights": outcome.weights if job.record_weights else None,
        }


class RayExecutor:
    """Runs epochs on a Ray cluster, ``workers`` at once (a :class:`~.protocol.ConcurrentExecutor`).

    Args:
        executor: What each worker trains epochs with: an epoch executor (an
            :class:`~lightning_fms.training.in_process.InProcessExecutor`), pickled to every worker, or a callable
            without arguments that builds one on the worker (for trial builders that do not pickle, such as a
            LightningCLI's).
        address: ``None``: the Ray instance this process is connected to, else a new local single-host cluster on
            127.0.0.1 (stopped by :meth:`close`); ``"auto"`` or ``"HOST:PORT"``: attach to a running cluster.
        workers: Epochs run at once (one long-lived Ray actor each).
        cpus_per_trial: Ray CPUs each worker holds (also its torch thread count, at least 1).
        gpus_per_trial: Ray GPUs each worker holds; may be fractional (``0.5``: two workers per GPU).
        mode: The driver's decision mode, ``"async"`` (decide whenever a worker frees) or ``"sync"`` (wait for
            all ``workers``, then decide as many; reproducible).
        refit: When the driver refits the surrogate off the decision path in ``"async"`` mode, one of
            :data:`~lightning_fms.parallel.driver.REFIT_POLICIES` (``"auto"``: once fits outlast the time between
            free workers).
        local: The epoch executor of :meth:`pretrained_module` and :meth:`frozen_layer_costs` in the driver's
            process (default: ``executor`` itself, or, when that is a callable, what it builds here on first use).
        init_options: Extra arguments of ``ray.init`` (they win over the executor's own).
        start_timeout: Seconds :meth:`start` waits for the workers to be placed and built.

    Raises:
        FMSError: a bad setting, or Ray is not installed (one line naming the ``ray`` extra).
    """

    def __init__(
        self,
        executor: Executor | Callable[[], Executor],
        *,
        address: str | None = None,
        workers: int = 1,
        cpus_per_trial: float = 1.0,
        gpus_per_trial: float = 0.0,
        mode: str = "async",
        refit: str = "auto",
        local: Executor | None = None,
        init_options: Mapping[str, Any] | None = None,
        start_timeout: float = 300.0,
    ) -> None:
        check_ray_settings(address, workers, cpus_per_trial, gpus_per_trial, mode, refit)
        if not (_is_executor(executor) or callable(executor)):
            raise FMSError("RayExecutor needs an epoch executor or a callable that builds one")
        self._ray = _ray(single_host=_is_loopback(address))
        self.executor = executor
        self.address = address
        self._workers = int(workers)
        self.cpus_per_trial = float(cpus_per_trial)
        self.gpus_per_trial = float(gpus_per_trial)
        self.mode = mode
        self.refit = refit
        self._local = local if local is not None else (executor if _is_executor(executor) else None)
        self.init_options = dict(init_options or {})
        self.start_timeout = float(start_timeout)
        self._token = uuid.uuid4().hex
        self._marked: set[str] = set()
        self._slots: list[_Slot] = []
        self._running: dict[Any, tuple[EpochJob, _Slot]] = {}  # object ref -> (job, slot), in submission order
        self._owns_connection = False
        self._started = False

    # ------------------------------------------------------------------ the protocol
    @property
    def workers(self) -> int:
        """How many epochs run at once."""
        return self._workers

    @property
    def labels(self) -> list[str]:
        """Each worker's label (``ray-w<index>@<node ip>``), known after :meth:`start`."""
        return [slot.label for slot in self._slots]

    @property
    def worker_pids(self) -> dict[str, int | None]:
        """Each worker's process id on its node, by label (after :meth:`start`; refreshed with every epoch)."""
        return {slot.label: slot.pid for slot in self._slots}

    def start(self) -> None:
        """Connect (or start a local cluster), place the workers and build their executors (idempotent).

        Raises:
            FMSError: the cluster cannot hold a worker, the workers could not be placed in time, or a worker's
                executor could not be built (its one line).
        """
        if self._started:
            return
        ray = self._ray
        if not ray.is_initialized():
            self._connect()
        self._started = True
        try:
            self._check_resources()
            self._place_workers()
        except BaseException:
            self.close()
            raise

    def _connect(self) -> None:
        ray = _ray(single_host=_is_loopback(self.address))
        options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if self.address is None:
            needed = math.ceil(self._workers * self.cpus_per_trial)
            options.update(address="local", num_cpus=max(os.cpu_count() or 1, needed))
        else:
            options["address"] = self.address
        options.update(self.init_options)
        try:
            ray.init(**options)
        except (ConnectionError, RuntimeError, ValueError) as error:
            where = "start a local Ray cluster" if self.address is None else f"attach to the Ray cluster {self.address}"
            raise FMSError(f"cannot {where}: {one_line(error, 300)}") from None
        self._owns_connection = True

    def _check_resources(self) -> None:
        total = self._ray.cluster_resources()
        for key, need in (("CPU", self.cpus_per_trial), ("GPU", self.gpus_per_trial)):
            have = float(total.get(key, 0.0))
            if need > 0 and have < need:
                raise FMSError(
                    f"the Ray cluster has {have:g} {key}s but ray.{key.lower()}s_per_trial is {need:g} "
                    f"(lower it, or add nodes with {key}s)"
                )

    def _place_workers(self) -> None:
        ray = self._ray
        remote = ray.remote(EpochWorker).options(
            num_cpus=self.cpus_per_trial,
            num_gpus=self.gpus_per_trial,
            max_restarts=-1,
            max_task_retries=0,
        )
        threads = max(1, int(self.cpus_per_trial))
        spec = ray.cloudpickle.dumps(self.executor)
        self._slots = [
            _Slot(i, remote.remote(spec, i, os.getcwd(), list(sys.path), threads)) for i in range(1, self._workers + 1)
        ]
        refs = [slot.actor.ready.remote() for slot in self._slots]
        done, pending = ray.wait(refs, num_returns=len(refs), timeout=self.start_timeout)
        if pending:
            raise FMSError(
                f"only {len(done)} of {self._workers} Ray workers started within {self.start_timeout:g} s "
                f"(each needs {self.cpus_per_trial:g} CPUs and {self.gpus_per_trial:g} GPUs; the cluster has "
                f"{self._describe(ray.cluster_resources())})"
            )
        for slot, info in zip(self._slots, ray.get(refs)):
            self._note(slot, info)
        errors = [info["setup_error"] for info in ray.get(refs) if "setup_error" in info]
        if errors:
            raise FMSError(errors[0])

    @staticmethod
    def _describe(resources: Mapping[str, float]) -> str:
        return ", ".join(f"{resources.get(k, 0.0):g} {k}s" for k in ("CPU", "GPU"))

    @staticmethod
    def _note(slot: _Slot, info: Mapping[str, Any]) -> None:
        slot.ip, slot.pid = str(info.get("ip", slot.ip)), info.get("pid", slot.pid)

    def _mark_storage(self, job: EpochJob) -> None:
        """Write the storage marker next to the job's trial folder (once per folder)."""
        root = job.log_dir.parent
        if str(root) not in self._marked:
            root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(root / STORAGE_MARKER, self._token + "\n")
            self._marked.add(str(root))

    def submit(self, job: EpochJob) -> str:
        """Start ``job`` on a free worker (starting the executor first if needed); the worker's label.

        Raises:
            FMSError: every worker is busy (wait for one first).
        """
        self.start()
        slot = self._free_slot()
        if slot is None:
            raise FMSError(f"all {self._workers} Ray workers are busy (wait for an epoch to end before submitting)")
        self._mark_storage(job)
        ref = slot.actor.run.remote(job, self._token)
        slot.busy = True
        self._running[ref] = (job, slot)
        return slot.label

    def wait(self, timeout: float | None = None) -> list[Finished]:
        """Block until at least one submitted epoch has ended (or ``timeout`` seconds passed); every one that ended.

        The list is in submission order. A worker that died mid-epoch gives ``Finished(lost=...)``.

        Raises:
            FMSError: a set-up problem on a worker (the first one's line); the other ended epochs are dropped.
        """
        if not self._running:
            return []
        ray = self._ray
        refs = list(self._running)
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if not ready:
            return []
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        ended = set(ready)
        finished: list[Finished] = []
        setup_errors: list[str] = []
        for ref in refs:
            if ref not in ended:
                continue
            job, slot = self._running.pop(ref)
            slot.busy = False
            result = self._collect(ref, slot)
            if isinstance(result, str):
                finished.append(Finished(job, slot.label, lost=result))
            elif "setup_error" in result:
                setup_errors.append(result["setup_error"])
            else:
                finished.append(Finished(job, slot.label, outcome=_outcome(result)))
        if setup_errors:
            raise FMSError(setup_errors[0])
        return finished

    def _lost_errors(self) -> tuple[type[BaseException], ...]:
        errors = self._ray.exceptions
        names = ("RayActorError", "WorkerCrashedError", "NodeDiedError", "ObjectLostError", "OwnerDiedError")
        return tuple(getattr(errors, name) for name in names if hasattr(errors, name))

    def _collect(self, ref: Any, slot: _Slot) -> dict[str, Any] | str:
        """A worker's result, or why its worker was lost (one line; the slot then waits for its restart)."""
        try:
            result = self._ray.get(ref)
        except self._lost_errors() as error:
            slot.restarting = True
            return f"{slot.label} was lost mid-epoch ({type(error).__name__}: {one_line(error, 160)})"
        self._note(slot, result)
        return result

    def _free_slot(self) -> _Slot | None:
        """A worker that is free; when only restarting ones are, the first to come back (``None``: all busy).

        Raises:
            FMSError: no restarting worker came back within ``start_timeout`` seconds.
        """
        free = [slot for slot in self._slots if not slot.busy]
        ready = next((slot for slot in free if not slot.restarting), None)
        if ready is not None or not free:
            return ready
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            for slot in free:
                try:  # a call to an actor that is restarting fails at once: ask again until it answers
                    info = self._ray.get(slot.actor.ready.remote(), timeout=max(0.1, deadline - time.monotonic()))
                except (*self._lost_errors(), self._ray.exceptions.GetTimeoutError):
                    continue
                self._note(slot, info)
                slot.restarting = False
                return slot
            time.sleep(0.2)
        raise FMSError(f"no lost Ray worker came back within {self.start_timeout:g} s ({free[0].label} was lost)")

    def run_epoch(self, job: EpochJob) -> EpochOutcome:
        """Train one epoch on a free worker and wait for it (again on a restarted worker if the first is lost).

        Raises:
            FMSError: a set-up problem (the study must stop), every worker busy, or the worker lost
                ``1 + 2`` times in a row.
        """
        self.start()
        reasons = []
        for _ in range(1 + _LOST_RETRIES):
            slot = self._free_slot()
            if slot is None:
                raise FMSError(f"all {self._workers} Ray workers are busy (wait for an epoch to end first)")
            self._mark_storage(job)
            slot.busy = True
            try:
                result = self._collect(slot.actor.run.remote(job, self._token), slot)
            finally:
                slot.busy = False
            if isinstance(result, str):
                reasons.append(result)
                continue
            if "setup_error" in result:
                raise FMSError(result["setup_error"])
            return _outcome(result)
        raise FMSError(f"epoch {job.epoch} of trial {job.trial_id}: {reasons[-1]} ({len(reasons)} times)")

    def close(self) -> None:
        """Stop the workers, and the local cluster or connection :meth:`start` made (idempotent).

        Epochs still running are abandoned (their checkpoints are never committed).
        """
        ray = self._ray
        if ray.is_initialized():
            for slot in self._slots:
                try:
                    ray.kill(slot.actor, no_restart=True)
                except Exception:  # already gone with its node
                    pass
        self._slots, self._running = [], {}
        if self._owns_connection and ray.is_initialized():
            ray.shutdown()
        self._owns_connection = False
        self._started = False

    def __enter__(self) -> RayExecutor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ in the driver's process
    def _driver_executor(self) -> Executor:
        if self._local is None:
            self._local = self.executor()  # type: ignore[operator]
        return self._local

    def pretrained_module(self, entry: str | None) -> nn.Module | None:
        """The hub entry's pretrained module, built in the driver's process (as the epoch executor builds it)."""
        return self._driver_executor().pretrained_module(entry)

    def frozen_layer_costs(
        self, configs: Sequence[dict[str, Any]], fractions: tuple[float, ...]
    ) -> list[tuple[float, ...]]:
        """The frozen-layer cost model, computed in the driver's process by the epoch executor."""
        return self._driver_executor().frozen_layer_costs(configs, fractions)


def _outcome(result: Mapping[str, Any]) -> EpochOutcome:
    return EpochOutcome(
        value=float(result["value"]),
        weights=result.get("weights"),
        error=result.get("error"),
        wall_s=float(result.get("wall_s", 0.0)),
        metrics=dict(result.get("metrics") or {}),
    )
