"""``python -m dbprofile.measure.distributed``: the worker entry (dbprofile.measure.distributed.launcher.main)."""

import sys

from dbprofile.measure.distributed.launcher import main

sys.exit(main())
