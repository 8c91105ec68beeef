import sys

from nkat_search.cli import main

sys.exit(main())
