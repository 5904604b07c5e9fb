from ratelimit_policyd.cli import main

raise SystemExit(main())
