"""The lowbit trainer: config, model/data building, the loop, strategies, checkpoints, CLI.

Import submodules directly (``lowbit.trainer.config``, ``lowbit.trainer.loop``); this package
module stays empty so that ``lowbit --help`` loads nothing heavy.
"""
