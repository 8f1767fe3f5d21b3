"""Subcommands of the ``wanda-lightning`` command line (see :mod:`wanda_lightning.cli`)."""
