import sys

from .device_build import main

sys.exit(main())
