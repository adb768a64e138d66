"""Entry-point wrapper: user errors become one line on stderr and a documented exit code, never a traceback.

Exit codes: 0 done; 2 bad input (config, paths, checkpoints, a refused --resume); 3 the run directory cannot be
written (disk full, read-only, a path that is a file: RunDirError); 4 the run directory is in use by another
live run (RunLockedError); 5 the training diverged: a non-finite loss, gradient or weight stopped it before the
epoch's checkpoints (TrainingDivergedError); 130 interrupted (Ctrl-C), continue with --resume. Anything else is a bug and keeps
its traceback.
"""

import errno
import sys

from .errors import UserError
from .run_dir_io import RunDirError, describe

# OS errors about the machine rather than the code: one line even when raised outside the run directory's writes.
_ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG)


def run_cli(main, argv=None):
    try:
        code = main(argv)
    except UserError as e:
        if not getattr(e, "quiet", False):  # an error all ranks agreed on is printed by rank 0 alone
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except OSError as e:
        if e.errno not in _ENVIRONMENT_ERRNOS:
            raise
        print(f"error: {describe(e, 'write', e.filename or '(unnamed file)')}", file=sys.stderr, flush=True)
        sys.exit(RunDirError.exit_code)
    except KeyboardInterrupt:
        print("interrupted; a run can be continued with --resume", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
