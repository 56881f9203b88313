"""``python -m lowbit.trainer`` runs the ``lowbit`` CLI (what torchrun and ``deepspeed --module`` call)."""

from lowbit.trainer.cli import entry_point

entry_point()
