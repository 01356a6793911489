"""``python -m edgelm``: the same command line as ``edgelm`` (for when the script is not on PATH)."""
import sys

from edgelm.cli import main

sys.exit(main())
