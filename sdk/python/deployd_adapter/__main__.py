import sys

from deployd_adapter.app import main

if __name__ == "__main__":
    sys.exit(main())
