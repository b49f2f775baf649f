from actors.cli.main import main

raise SystemExit(main())
