"""Stand-in of modules/errors.py (v1.10): error reporting that never raises.

`exception_records` keeps the last 5 reported exceptions exactly as the real module does; tests read it to see
that a hook failed and was only reported.
"""

import sys
import textwrap
import traceback

exception_records = []


# modules/errors.py (v1.10): format_traceback / format_exception / get_exceptions / record_exception
def format_traceback(tb):
    return [[f"{x.filename}, line {x.lineno}, {x.name}", x.line] for x in traceback.extract_tb(tb)]


def format_exception(e, tb):
    return {"exception": str(e), "traceback": format_traceback(tb)}


def get_exceptions():
    try:
        return list(reversed(exception_records))
    except Exception as e:
        return str(e)


def record_exception():
    _, e, tb = sys.exc_info()
    if e is None:
        return

    if exception_records and exception_records[-1] == e:
        return

    exception_records.append(format_exception(e, tb))

    if len(exception_records) > 5:
        exception_records.pop(0)


# modules/errors.py (v1.10): report
def report(message: str, *, exc_info: bool = False) -> None:
    """Print an error message to stderr, with optional traceback."""

    record_exception()

    for line in message.splitlines():
        print("***", line, file=sys.stderr)
    if exc_info:
        print(textwrap.indent(traceback.format_exc(), "    "), file=sys.stderr)
        print("---", file=sys.stderr)


# modules/errors.py (v1.10): print_error_explanation
def print_error_explanation(message):
    record_exception()

    lines = message.strip().split("\n")
    max_len = max([len(x) for x in lines])

    print('=' * max_len, file=sys.stderr)
    for line in lines:
        print(line, file=sys.stderr)
    print('=' * max_len, file=sys.stderr)


# modules/errors.py (v1.10): display
def display(e: Exception, task, *, full_traceback=False):
    record_exception()

    print(f"{task or 'error'}: {type(e).__name__}", file=sys.stderr)
    te = traceback.TracebackException.from_exception(e)
    if full_traceback:
        # include frames leading up to the try-catch block
        te.stack = traceback.StackSummary(traceback.extract_stack()[:-2] + te.stack)
    print(*te.format(), sep="", file=sys.stderr)


already_displayed = {}


# modules/errors.py (v1.10): display_once
def display_once(e: Exception, task):
    record_exception()

    if task in already_displayed:
        return

    display(e, task)

    already_displayed[task] = 1


# modules/errors.py (v1.10): run
def run(code, task):
    try:
        code()
    except Exception as e:
        display(task, e)
