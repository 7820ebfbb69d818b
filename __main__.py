from jambatrt.cli import main

raise SystemExit(main())
