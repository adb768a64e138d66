"""Entry-point wrapper: user errors become one line on stderr and exit code 2, never a traceback."""

import sys

from .errors import UserError


def run_cli(main, argv=None):
    try:
        code = main(argv)
    except UserError as e:
        if not getattr(e, "quiet", False):  # an error all ranks agreed on is printed by rank 0 alone
            print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted; a run can be continued with --resume", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
