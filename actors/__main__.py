from actors.cli import main

raise SystemExit(main())
