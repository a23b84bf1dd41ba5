"""`python -m fedsilo` is the `fedsilo` command."""

import sys

from fedsilo.cli import main

sys.exit(main())
