import sys

from quasar.cli import main

if __name__ == "__main__":
    sys.exit(main())
