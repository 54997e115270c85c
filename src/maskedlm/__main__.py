"""`python -m maskedlm` (what torchrun runs): the same as the `maskedlm` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
