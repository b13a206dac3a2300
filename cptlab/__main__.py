from cptlab.cli import main

raise SystemExit(main())
