"""Writing files all-or-nothing, with the mode a plain ``open()`` gives, and reading JSON objects.

Everything sdkit writes (PNGs, ``save_pretrained`` folders, training checkpoints, single-file
checkpoints) goes through :func:`atomic_write` or :class:`AtomicFiles`: each file is written to a
temporary name beside it and renamed into place only when every file of the group is complete,
so a failed or interrupted write leaves the old files as they were and no new ones.
"""

import contextlib
import json
import os
import tempfile
from pathlib import Path

TEMP_PREFIX = ".sdkit-"  # temporaries are hidden files beside their target


def _umask():
    """The process umask, read without changing it where /proc allows (os.umask sets it to read it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_mode(path):
    """The permission bits ``open(path, "w")`` would leave: an existing file keeps its own, a new one
    gets 0666 less the umask (``mkstemp`` alone would give 0600)."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~_umask()


class AtomicFiles:
    """A group of files written all or none.

        with AtomicFiles() as files:
            image.save(files.reserve("out.png"))      # write to the temporary path returned
            big.save(files.reserve("out.x4.png"))
        # both renamed into place here; on any exception (or SIGINT) neither is, temporaries removed

    Files that existed before are replaced only at the end, each by one rename (never half
    written); if a rename fails, the ones already done are put back.
    """

    def __init__(self):
        self._pending = []  # (temporary, final)

    def reserve(self, path):
        """A temporary path to write ``path``'s content to (in the same folder, so renaming is atomic)."""
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX, suffix=os.path.basename(path))
        os.close(fd)
        self._pending.append((tmp, path))
        return tmp

    def discard(self):
        """Remove every temporary; the targets are untouched."""
        for tmp, _ in self._pending:
            if os.path.lexists(tmp):
                os.remove(tmp)
        self._pending = []

    def commit(self):
        """Rename every temporary onto its target (keeping the mode a plain open() gives)."""
        done = []  # (final, whether it existed, a hard link to the file it replaced or None)
        try:
            for tmp, final in self._pending:
                os.chmod(tmp, plain_mode(final))
                existed, backup = os.path.lexists(final), None
                if os.path.isfile(final):
                    try:
                        os.link(final, tmp + ".old")
                        backup = tmp + ".old"
                    except OSError:  # no hard links here: this one cannot be put back
                        pass
                os.replace(tmp, final)
                done.append((final, existed, backup))
        except BaseException:
            for final, existed, backup in reversed(done):
                if backup is not None:
                    os.replace(backup, final)
                elif not existed:
                    os.remove(final)
            self.discard()
            raise
        for _, _, backup in done:
            if backup is not None:
                os.remove(backup)
        self._pending = []

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if kind is None:
            self.commit()
        else:
            self.discard()
        return False


@contextlib.contextmanager
def plain_modes(folder):
    """Give the files another library writes into ``folder`` a plain open()'s mode (some write 0600).

        with plain_modes(folder):
            text_encoder.save_pretrained(folder)
    """
    before = {p: p.stat().st_mode & 0o7777 for p in Path(folder).rglob("*") if p.is_file()}
    yield
    new = 0o666 & ~_umask()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, before.get(path, new))


def atomic_write(path, write):
    """``write(tmp_path)``, then rename onto ``path``: no half-written file, and a plain open()'s mode."""
    with AtomicFiles() as files:
        write(files.reserve(path))
    return path


def read_json_object(path, what="config"):
    """The JSON object in ``path``; a file that is not valid JSON or not an object is a ValueError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): repair or download the {what} again.") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file: the {what} should be JSON; download it again.") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} should hold a JSON object ({{...}}), found a {type(value).__name__}: "
                         f"repair or download the {what} again.")
    return value


def cached_read(cache, lock, size, path, read):
    """``read(path)``, kept in ``cache`` (an OrderedDict, least recently used first, at most ``size``
    entries, guarded by ``lock``) while the file's path, mtime and size are unchanged; the read itself
    runs outside the lock."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_mtime_ns, stat.st_size)
    with lock:
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
    value = read(path)
    with lock:
        cache[key] = value
        while len(cache) > size:
            cache.popitem(last=False)
    return value
