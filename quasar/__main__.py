import sys

from quasar.demo import main

if __name__ == "__main__":
    sys.exit(main())
