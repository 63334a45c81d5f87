"""A study driver the fault tests run as a process of its own (and kill with -9): it attaches to a Ray cluster.

    python -m lightning_fms.testing.fault_driver ADDRESS HUB_YAML STUDY_DIR BUDGET

It prints one JSON line with its workers' process ids once they are up, and one when the study is done.
"""

from __future__ import annotations

import json
import sys

from lightning_fms.hub import ModelHub
from lightning_fms.parallel.ray_executor import RayExecutor
from lightning_fms.testing.fault_trials import MY_NODES, epoch_executor, study_options
from lightning_fms.tuner import FMSTuner


def main(address: str, hub_yaml: str, study_dir: str, budget: int) -> None:
    """Run the study on the cluster at ``address``, printing the workers' pids first and the epochs spent last."""
    hub = ModelHub.from_yaml(hub_yaml)
    executor = RayExecutor(
        epoch_executor(hub, step_delay=0.05),
        address=address,
        workers=1,
        cpus_per_trial=0.5,
        worker_options=MY_NODES,
    )
    executor.start()
    print(json.dumps({"workers": executor.worker_pids}), flush=True)
    result = FMSTuner(executor=executor, **study_options(hub, study_dir, budget)).run()
    executor.close()
    print(json.dumps({"epochs_spent": result.epochs_spent}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
