"""`python -m hwrjax.cli COMMAND ...`: the `hwrjax` command."""

import sys

from hwrjax.cli import main

sys.exit(main())
