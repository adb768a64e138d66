"""Entry-point wrapper: user errors become one line on stderr and a documented exit code, never a traceback.

Exit codes: 0 done; 2 bad input (config, paths, checkpoints, a refused --resume); 3 the run directory cannot be
written (disk full, read-only, a path that is a file: RunDirError); 4 the run directory is in use by another
live run (RunLockedError); 5 the training diverged: a non-finite loss, gradient or weight stopped it before the
epoch's checkpoints (TrainingDivergedError); 130 interrupted (Ctrl-C), continue with --resume. Anything else is a bug and keeps
its traceback.
"""

import errno
import importlib
import importlib.util
import os
import sys

from .errors import UserError
from .run_dir_io import RunDirError, describe

# OS errors about the machine rather than the code: one line even when raised outside the run directory's writes.
_ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG)


def run_cli(main, argv=None):
    try:
        code = main(argv)
    except UserError as e:
        if not getattr(e, "quiet", False):  # an error all ranks raised was printed by rank 0 (raise_on_every_rank)
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


def parse_args_anywhere(parser, argv=None, opts="opts"):
    """`parser.parse_args(argv)` for a tool whose last positional, `opts`, takes the `KEY VALUE` pairs
    (nargs=argparse.REMAINDER): the parser's flags without a value (e.g. --resume) are also accepted after or
    between the pairs. argparse alone hands such a flag to the pairs, where it stops the run as a key without a
    value. An option that takes a value there, or an unknown `--x` where a key belongs, is one clear error
    instead of a confusing config-key one; the pairs themselves are left to the config loader's checks."""
    args = parser.parse_args(argv)
    rest = []
    for token in getattr(args, opts):
        action = parser._option_string_actions.get(token)  # argparse's own table of option strings
        if action is None:
            rest.append(token)
        elif action.dest == "help":
            parser.print_help()
            parser.exit()
        elif action.nargs != 0:
            raise UserError(f"{token} takes a value: put it before the KEY VALUE pairs")
        else:
            setattr(args, action.dest, action.const)
    for key in rest[0::2]:
        if key.startswith("--"):
            known = ", ".join(a.option_strings[-1] for a in parser._actions if a.option_strings)
            raise UserError(f"unknown option {key} (the options are {known}); config keys have no leading "
                            f"dashes, e.g. SOLVER.EPOCHS 8")
    setattr(args, opts, rest)
    return args


def import_components(names):
    """Import each of `names` (a dotted module name, or the path of a .py file) so that the components it
    registers (a method, a loss term, an update rule, a dataset) exist before the config is read: one file of
    yours, no edit to the package. A name that cannot be imported is one clear error."""
    for name in names:
        if name.endswith(".py"):
            if not os.path.isfile(name):
                raise UserError(f"--import {name}: no such file")
            module = os.path.splitext(os.path.basename(name))[0]
            spec = importlib.util.spec_from_file_location(module, name)
            loaded = importlib.util.module_from_spec(spec)
            sys.modules[module] = loaded
            spec.loader.exec_module(loaded)
        else:
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as e:
                if e.name is None or not name.startswith(e.name):
                    raise  # the module exists but one of its own imports is missing: its traceback says which
                raise UserError(f"--import {name}: no module of that name on the Python path (give a .py file's "
                                f"path, or run from the folder that holds it)") from None
