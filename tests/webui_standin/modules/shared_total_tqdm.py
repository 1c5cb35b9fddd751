"""Stand-in of modules/shared_total_tqdm.py (v1.10): the whole-job progress bar; counts steps, prints nothing."""


class TotalTQDM:
    def __init__(self):
        self._tqdm = None
        self.total = 0
        self.n = 0

    def reset(self):
        self.n = 0

    def update(self):
        self.n += 1

    def updateTotal(self, new_total):
        self.total = new_total

    def clear(self):
        self.n = 0
        self.total = 0
