"""`python -m moeplan ...` is the `moeplan` command."""

import sys

from moeplan.cli import main

sys.exit(main())
