"""``python -m randlora_peft``: the ``randlora-peft`` command line."""

import sys

from randlora_peft.cli import main

sys.exit(main())
