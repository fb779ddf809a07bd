"""`python -m realtime` is `mcihn-live`."""

import sys

from realtime.cli import main

sys.exit(main())
