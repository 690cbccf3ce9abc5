"""``python -m bench`` from a checkout (``prefopt bench`` once installed)."""
import sys

from .cli import main

sys.exit(main())
