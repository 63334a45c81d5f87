"""The study directory: locks, atomic files, checkpoint hashes, weight snapshots and the reports."""
