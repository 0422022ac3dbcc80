import sys

from circuitkit.cli import main

sys.exit(main())
