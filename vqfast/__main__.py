"""``python -m vqfast``: the vqfast command (vqfast.cli.main)."""

import sys

from .cli.main import main

sys.exit(main())
