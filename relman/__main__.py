from relman.cli import main

raise SystemExit(main())
