"""``python -m lambda_pool``: the ``lambda-pool`` command, for environments without its script."""

from __future__ import annotations

import sys

from lambda_pool.cli import main

sys.exit(main())
