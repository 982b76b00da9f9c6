"""What the command-line programs in tools/ share at their exit."""
import os
import sys
from pathlib import Path
from typing import Callable, NoReturn


def run_main(main: Callable[[], int | None]) -> NoReturn:
    """Exit with `main()`'s status. Ctrl-C ends the program with one line and status 130 (the
    shell's for SIGINT) instead of a traceback; the writers in megagpt.fsutil have removed their
    temporary files by then. Output piped into a reader that stops early (`| head`) ends it
    quietly with status 141, a shell's for SIGPIPE, as a C tool's, not with a traceback and 1
    (which validate_config.py gives an invalid config)."""
    try:
        status = main()
        if sys.stdout is not None:   # None when the program started with stdout closed
            sys.stdout.flush()       # what is still buffered meets the closed pipe here
    except KeyboardInterrupt:
        print(f"{Path(sys.argv[0]).name}: interrupted (Ctrl-C)", file=sys.stderr)
        status = 130
    except BrokenPipeError:
        # Python flushes stdout again at exit: send that to nowhere, not to the closed pipe
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = 141
    sys.exit(status)
