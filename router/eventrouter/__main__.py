"""Run the `eventrouter` command with `python -m eventrouter`."""

import sys

from eventrouter.cli import main

sys.exit(main())
