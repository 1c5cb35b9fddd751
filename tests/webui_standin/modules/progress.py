"""Stand-in of modules/progress.py (v1.10): the task bookkeeping behind `/internal/progress` and the progress bar.

Reproduced: `current_task`, `pending_tasks`, `finished_tasks` and the functions that move a task between them, and
what `progressapi` answers (active / queued / completed, progress fraction and ETA from `shared.state`) as a plain
function, `progress_of(id_task)`. The FastAPI route and live previews are not reproduced.
"""

import random
import string
import time
from collections import OrderedDict

from modules import shared

current_task = None
pending_tasks = OrderedDict()
finished_tasks = []
recorded_results = []
recorded_results_limit = 2


def start_task(id_task):
    global current_task

    current_task = id_task
    pending_tasks.pop(id_task, None)


def finish_task(id_task):
    global current_task

    if current_task == id_task:
        current_task = None

    finished_tasks.append(id_task)
    if len(finished_tasks) > 16:
        finished_tasks.pop(0)


def create_task_id(task_type):
    N = 7
    res = ''.join(random.choices(string.ascii_uppercase + string.digits, k=N))
    return f"task({task_type}-{res})"


def record_results(id_task, res):
    recorded_results.append((id_task, res))
    if len(recorded_results) > recorded_results_limit:
        recorded_results.pop(0)


def add_task_to_queue(id_job):
    pending_tasks[id_job] = time.time()


def progress_of(id_task) -> dict:
    """What /internal/progress answers for a task (modules/progress.py v1.10, progressapi), without previews."""
    active = id_task == current_task
    queued = id_task in pending_tasks
    completed = id_task in finished_tasks
    if not active:
        return dict(active=active, queued=queued, completed=completed, progress=None, eta=None,
                    textinfo="In queue..." if queued else "Waiting...")
    state = shared.state
    progress = 0
    job_count, job_no = state.job_count, state.job_no
    sampling_steps, sampling_step = state.sampling_steps, state.sampling_step
    if job_count > 0:
        progress += job_no / job_count
    if sampling_steps > 0 and job_count > 0:
        progress += 1 / job_count * sampling_step / sampling_steps
    progress = min(progress, 1)
    elapsed_since_start = time.time() - state.time_start
    predicted_duration = elapsed_since_start / progress if progress > 0 else None
    eta = predicted_duration - elapsed_since_start if predicted_duration is not None else None
    return dict(active=active, queued=queued, completed=completed, progress=progress, eta=eta,
                textinfo=state.textinfo)
