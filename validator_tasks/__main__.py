import sys

from validator_tasks.cli import main

sys.exit(main())
