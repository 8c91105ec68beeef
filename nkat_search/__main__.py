import sys

from nkat_search.cli.main import main

sys.exit(main())
