"""`python -m mme5.demo --out DIR --seed N`: build the demo world (see mme5.demo.world)."""

from mme5.demo.world import main

raise SystemExit(main())
