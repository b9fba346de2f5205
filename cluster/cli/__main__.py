"""``python -m dspark.cluster.cli``: the ``dspark`` console script."""

from dspark.cluster.cli import main

raise SystemExit(main())
