"""`python -m app.cli`: the `facemoe` command."""

import sys

from app.cli import main

sys.exit(main())
