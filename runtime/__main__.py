"""`python -m runtime` is `python -m runtime.run`."""

import sys

from runtime.run import main

sys.exit(main())
