"""Stand-in of modules/call_queue.py (v1.10): the queue lock every generation runs under.

Copied: `queue_lock` and `wrap_queued_call`. The real lock is a `fifo_lock.FIFOLock` (first come, first served);
a plain lock has the same exclusion, which is what tests observe. The gradio wrappers are not reproduced.
"""

import threading

queue_lock = threading.Lock()


def wrap_queued_call(func):
    def f(*args, **kwargs):
        with queue_lock:
            res = func(*args, **kwargs)

        return res

    return f
