"""Where an epoch runs: the executor, the Trainer it builds, the callback that reports an epoch, the trial seeder."""
