"""Stand-in of modules/cache.py (v1.10): per-subsection caches keyed by title, with file mtimes.

The real module persists them with `diskcache` under `<data_path>/cache`; the stand-in keeps them in memory
(`caches`), which the harness clears between tests. `cached_data_for_file` is the real logic.
"""

import os
import threading

caches = {}
cache_lock = threading.Lock()

on_disk: dict[str, dict] = {}
"""What the real module's diskcache directories hold, per subsection. The real `cache()` below replaces a cache
object that is empty (falsy: diskcache.Cache has __len__) with a new one; the real new object opens the same
directory, so nothing written is lost. The stand-in's caches share this store to behave the same way (a plain new
dict would drop every write made to the previous, empty one). The harness clears it between tests."""


def dump_cache():
    """old function for dumping cache to disk; does nothing since diskcache (and in the stand-in)."""
    pass


def make_cache(subsection: str) -> dict:
    # modules/cache.py (v1.10): diskcache.Cache(os.path.join(cache_dir, subsection), ...) — same directory, same data
    return on_disk.setdefault(subsection, {})


# modules/cache.py (v1.10): cache
def cache(subsection):
    cache_obj = caches.get(subsection)
    if not cache_obj:
        with cache_lock:
            cache_obj = caches.get(subsection)
            if not cache_obj:
                cache_obj = make_cache(subsection)
                caches[subsection] = cache_obj

    return cache_obj


# modules/cache.py (v1.10): cached_data_for_file
def cached_data_for_file(subsection, title, filename, func):
    existing_cache = cache(subsection)
    ondisk_mtime = os.path.getmtime(filename)

    entry = existing_cache.get(title)
    if entry:
        cached_mtime = entry.get("mtime", 0)
        if ondisk_mtime > cached_mtime:
            entry = None

    if not entry or 'value' not in entry:
        value = func()
        if value is None:
            return None

        entry = {'mtime': ondisk_mtime, 'value': value}
        existing_cache[title] = entry

        dump_cache()

    return entry['value']
