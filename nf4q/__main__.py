"""`python -m nf4q ...` is the `nf4q` command."""
import sys

from .cli import main

sys.exit(main())
