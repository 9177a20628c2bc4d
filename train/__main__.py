"""`python -m train [flags]`: see `train.main`."""

from train.main import main

raise SystemExit(main())
