import sys

from pacs_ai.cli import main

sys.exit(main())
