import sys

from kd_ray.cli import main

sys.exit(main())
