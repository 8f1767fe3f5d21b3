"""``python -m wanda_lightning.cli``: the same as the ``wanda-lightning`` command."""

import sys

from . import main

sys.exit(main())
