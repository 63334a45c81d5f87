"""Epochs in flight at once: the concurrent-executor contract, the driver that keeps the workers busy, Ray.

* :mod:`~lightning_fms.parallel.protocol`: what an executor that runs several epochs at once offers
  (:class:`~lightning_fms.parallel.protocol.ConcurrentExecutor`).
* :mod:`~lightning_fms.parallel.driver`: the tuner's loop over such an executor (claim one epoch per free
  worker, commit each as it ends, give back the epochs of lost workers), asynchronous or in synchronous batches.
* :mod:`~lightning_fms.parallel.ray_executor`: the executor on a Ray cluster (the ``ray`` extra).
* :mod:`~lightning_fms.parallel.simulation`: a simulated cluster that drives the real decider at scale.
"""
