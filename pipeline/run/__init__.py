"""A run: the one worker pool, the stages after storage, and the run from lock to summary."""
