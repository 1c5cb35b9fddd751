"""Stand-in of modules/timer.py (v1.10): Timer with record()/summary(); timings are not reported anywhere."""

import time


class Timer:
    def __init__(self, print_log=False):
        self.start = time.time()
        self.records = {}
        self.total = 0
        self.print_log = print_log

    def elapsed(self):
        end = time.time()
        res = end - self.start
        self.start = end
        return res

    def record(self, category, extra_time=0, disable_log=False):
        e = self.elapsed()
        self.records[category] = self.records.get(category, 0) + e + extra_time
        self.total += e + extra_time

    def summary(self):
        return f"{self.total:.1f}s"

    def reset(self):
        self.__init__()


startup_timer = Timer()
