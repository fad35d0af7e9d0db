"""`python -m graphprune.cli` (what torchrun runs)."""

import sys

from graphprune.cli.main import main

sys.exit(main())
