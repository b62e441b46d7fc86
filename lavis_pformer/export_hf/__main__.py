import sys

from lavis_pformer.export_hf.cli import main

sys.exit(main())
