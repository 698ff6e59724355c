"""The training machinery the one loop (`ddep_jax.trainers.loop`) is built
from: the stage type (`stage`), the train step and state (`step`), workdir
bookkeeping (`workdir`), preemption (`preemption`), progress and logging
(`progress`). The stages themselves are the trainer modules of
`ddep_jax.trainers`."""
