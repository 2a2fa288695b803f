import sys

from hwslim.cli import main

sys.exit(main())
