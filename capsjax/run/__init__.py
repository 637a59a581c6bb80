"""Run plumbing: the config of a run, its workdir, checkpoints, signals and host runtime.

None of it is needed to use the capsule operations, layers or models; the driver
(`capsjax.train`, `capsjax.evaluate`) is what uses it.
"""
