from sipis.cli import main

raise SystemExit(main())
