"""``python -m vswitch.daemon``: vswitchd."""
import sys

from vswitch.daemon.main import main

sys.exit(main())
