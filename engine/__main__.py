from nextn.cli import main

raise SystemExit(main())
