"""CommandRunner: one epoch trained by the user's own command, the way ``lightning-fms agent`` runs it.

The command (``python train.py fit --config my.yaml``) is run once per epoch with the trial's values appended as
``--key=value`` (the hub choice as its entry's weights file, :func:`~lightning_fms.hub.bind_weight_files`),
``--ckpt_path=<checkpoint>`` when the trial resumes, and the environment variables of
:mod:`lightning_fms.training.callback`. The script's ``FMSCheckpointCallback()`` seeds the run as the in-process
executor seeds the trial, stops it after the epoch, saves the checkpoint and writes a result JSON and, when the
job asks for weights, a safetensors file of the named submodule beside it, which the runner reads back (never
unpickled), checks against the hub entry's network and returns in :attr:`EpochOutcome.weights`.

This is the agent's counterpart of the in-process executor for one :class:`~lightning_fms.training.executor.EpochJob`,
not a full executor: whatever goes wrong in the command fails the trial, except a set-up problem no trial would
escape (recorded weights that are not the hub network's), which raises :class:`~lightning_fms.errors.FMSError`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from lightning_fms.errors import FMSError, one_line
from lightning_fms.hub import ModelHub, bind_weight_files
from lightning_fms.training.callback import (
    ENV_CHECKPOINT,
    ENV_EPOCH,
    ENV_MONITOR,
    ENV_RESULT,
    ENV_RESUME,
    ENV_SEED,
    ENV_STUDY_DIR,
    ENV_TRIAL,
    ENV_WEIGHTS,
    ENV_WEIGHTS_ATTRIBUTE,
)
from lightning_fms.training.executor import EpochJob, EpochOutcome
from lightning_fms.training.seeder import initial_seed
from lightning_fms.training.trial_builder import DEFAULT_HUB_ARGUMENT

__all__ = ["CommandRunner", "command_line"]


def command_line(command: Sequence[str], config: Mapping[str, Any], resume: Path | None) -> list[str]:
    """The user's command plus ``--key=value`` per configuration value and ``--ckpt_path=...`` when resuming."""
    out = [*command, *(f"--{key}={_cli_value(value)}" for key, value in config.items())]
    if resume is not None:
        out.append(f"--ckpt_path={resume}")
    return out


def _cli_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


class CommandRunner:
    """Trains an :class:`~lightning_fms.training.executor.EpochJob` by running the user's command once.

    Args:
        command: The user's command (``python my_finetune.py ...``).
        study_dir: The study directory (``LIGHTNING_FMS_STUDY_DIR``: it switches the callback to agent mode).
        hub_key: The space's hub choice (``None``: none).
        hub: The model hub its values name (``None``: none).
        weights_attribute: Submodule of the script's LightningModule whose weights a job with ``record_weights``
            gets (``None``: ``net``; ``""``: the whole module); they must be the hub entry's network.
    """

    def __init__(
        self,
        command: Sequence[str],
        study_dir: Path,
        *,
        hub_key: str | None = None,
        hub: ModelHub | None = None,
        weights_attribute: str | None = None,
    ) -> None:
        self.command = list(command)
        self.study_dir = Path(study_dir)
        self.hub_key = hub_key
        self.hub = hub
        self.weights_attribute = DEFAULT_HUB_ARGUMENT if weights_attribute is None else weights_attribute
        self._shapes: dict[str, dict[str, tuple[int, ...]]] = {}

    @staticmethod
    def weights_file(job: EpochJob) -> Path:
        """Where the script's callback writes the job's weights: beside its result JSON."""
        return job.log_dir / f"epoch-{job.epoch}.safetensors"

    def environment(self, job: EpochJob, result: Path) -> dict[str, str]:
        """The variables the command runs with (beside the agent's own environment)."""
        weights = self.weights_file(job)
        return {
            ENV_STUDY_DIR: str(self.study_dir.resolve()),
            ENV_TRIAL: str(job.trial_id),
            ENV_EPOCH: str(job.epoch),
            ENV_RESUME: str(job.resume_from) if job.resume_from is not None else "",
            ENV_RESULT: str(result.resolve()),
            ENV_MONITOR: job.monitor,
            ENV_CHECKPOINT: str(job.checkpoint_out.resolve()),
            ENV_SEED: str(job.seed),
            "PL_GLOBAL_SEED": str(initial_seed(job.seed, job.trial_id)),  # LightningCLI's seed_everything: true
            ENV_WEIGHTS: str(weights.resolve()) if job.record_weights else "",
            ENV_WEIGHTS_ATTRIBUTE: self.weights_attribute if job.record_weights else "",
        }

    def run_epoch(self, job: EpochJob) -> EpochOutcome:
        """Run the command for the job's epoch; what it reported (its checkpoint is on disk unless it failed).

        The command's stdout and stderr go to ``<log_dir>/epoch-<k>.stdout|.stderr``.

        Raises:
            FMSError: the recorded weights are missing or not the hub entry's network (a set-up problem).
        """
        epoch = job.epoch
        job.log_dir.mkdir(parents=True, exist_ok=True)
        result = job.log_dir / f"epoch-{epoch}.json"
        weights = self.weights_file(job)
        for stale in (job.checkpoint_out, result, weights):
            stale.unlink(missing_ok=True)
        env = {**os.environ, **self.environment(job, result)}
        argv = command_line(self.command, bind_weight_files(job.config, self.hub_key, self.hub), job.resume_from)
        start = time.perf_counter()
        stderr_path = job.log_dir / f"epoch-{epoch}.stderr"
        with open(job.log_dir / f"epoch-{epoch}.stdout", "wb") as out, open(stderr_path, "wb") as err:
            try:
                code = subprocess.run(argv, stdout=out, stderr=err, env=env, check=False).returncode
            except OSError as error:
                return EpochOutcome(
                    error=f"cannot run {argv[0]!r}: {error.strerror}", wall_s=time.perf_counter() - start
                )
        wall_s = time.perf_counter() - start
        if code != 0:
            return EpochOutcome(
                error=_last_line(stderr_path) or f"the command exited with status {code}", wall_s=wall_s
            )
        if not result.exists():
            return EpochOutcome(
                error="the command wrote no result: add FMSCheckpointCallback() to its Trainer's callbacks",
                wall_s=wall_s,
            )
        data = json.loads(result.read_text())
        if data.get("weights_error"):  # every trial would fail the same way
            raise FMSError(str(data["weights_error"]))
        if data.get("error"):
            return EpochOutcome(error=str(data["error"]), wall_s=wall_s)
        if int(data.get("epoch", 0)) != epoch:
            return EpochOutcome(
                error=f"the run ended at epoch {data.get('epoch')}, not {epoch} "
                "(is the Trainer's max_epochs too small?)",
                wall_s=wall_s,
            )
        if not job.checkpoint_out.exists():
            return EpochOutcome(error=f"the run saved no checkpoint at {job.checkpoint_out}", wall_s=wall_s)
        value = data.get("value")
        outcome = EpochOutcome(value=float(value) if value is not None else math.nan, wall_s=wall_s)
        if job.record_weights:
            outcome.weights = self._recorded_weights(weights, bool(data.get("weights")), job.config)
        return outcome

    def _recorded_weights(self, path: Path, written: bool, config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The weights the callback wrote (read, then deleted), checked against the hub entry's network.

        Raises:
            FMSError: none were written, or their names or shapes are not the network's.
        """
        if not written or not path.exists():
            raise FMSError(
                f"the study reads weights but the command's FMSCheckpointCallback wrote none (expected {path})"
            )
        try:
            state = load_file(str(path))
        except Exception as error:  # safetensors raises several types for a torn or foreign file
            raise FMSError(f"the weights file {path} the command wrote is unreadable: {one_line(error)}") from None
        path.unlink(missing_ok=True)  # the study keeps its own snapshot of them
        entry = str(config.get(self.hub_key)) if self.hub_key is not None else ""
        expected = self._expected_shapes(entry)
        got = {name: tuple(tensor.shape) for name, tensor in state.items()}
        if expected is not None and got != expected:
            missing = sorted(set(expected) - set(got))
            unexpected = sorted(set(got) - set(expected))
            reshaped = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
            detail = "; ".join(
                f"{what}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
                for what, names in (("missing", missing), ("unexpected", unexpected), ("other shape", reshaped))
                if names
            )
            raise FMSError(
                f"the weights the command recorded (submodule {self.weights_attribute!r}) are not hub entry "
                f"{entry!r}'s network ({detail}); give --weights_attribute the submodule that holds it"
            )
        return state

    def _expected_shapes(self, entry: str) -> dict[str, tuple[int, ...]] | None:
        """Names and shapes of the hub entry's ``state_dict`` (``None`` without a hub)."""
        if self.hub is None or not entry:
            return None
        if entry not in self._shapes:
            self._shapes[entry] = {k: tuple(v.shape) for k, v in self.hub.build(entry).state_dict().items()}
        return self._shapes[entry]


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""
