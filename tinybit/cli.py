"""What the command-line tools share: one-line errors and exit codes, flag checks, writes to stdout."""
import argparse
import os
import sys

import numba

from .errors import TinybitError, UsageError


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (and exit code 2)."""
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def check_threads(threads):
    """-t/--threads within 1..the cores numba sees (the kernels' thread pool), else a UsageError."""
    n_max = numba.config.NUMBA_NUM_THREADS
    if threads is not None and not 1 <= threads <= n_max:
        raise UsageError(f"-t/--threads must be in 1..{n_max} (the cores numba sees), got {threads}")


def exit_on_error(prog, debug, body):
    """body()'s exit code; a TinybitError is one line on stderr and 2 (with debug, the traceback), Ctrl-C one line
    and 130, a reader of stdout gone away (`| head`) a quiet 141, as SIGPIPE would be."""
    try:
        return body()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # /dev/null: the flush at exit would fail again
        return 141
    except TinybitError as e:
        if debug:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def write_out(out, text):
    """text to out (stdout), flushed; a failed write (full disk) is a UsageError, a BrokenPipeError is re-raised."""
    try:
        out.write(text)
        out.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())  # as in exit_on_error
        raise UsageError(f"cannot write to standard output: {e.strerror}") from None
