"""``python -m loramix ...`` runs the same command line as ``loramix ...``."""
import sys

from .cli import main

sys.exit(main())
