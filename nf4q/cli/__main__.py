"""`python -m nf4q.cli ...` is the `nf4q` command too."""
import sys

from . import main

sys.exit(main())
