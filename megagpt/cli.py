"""What the command-line programs in tools/ share at their exit."""
import sys
from pathlib import Path
from typing import Callable, NoReturn


def run_main(main: Callable[[], int | None]) -> NoReturn:
    """Exit with `main()`'s status. Ctrl-C ends the program with one line and status 130 (the
    shell's for SIGINT) instead of a traceback; the writers in megagpt.fsutil have removed their
    temporary files by then."""
    try:
        status = main()
    except KeyboardInterrupt:
        print(f"{Path(sys.argv[0]).name}: interrupted (Ctrl-C)", file=sys.stderr)
        status = 130
    sys.exit(status)
