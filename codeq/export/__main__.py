"""`python -m codeq.export RUN_DIR ...` (see codeq.export.cli)."""

import sys

from codeq.export.cli import main

sys.exit(main())
