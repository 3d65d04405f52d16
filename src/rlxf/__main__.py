import sys

from rlxf.cli import main

sys.exit(main())
