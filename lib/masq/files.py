"""Files written whole: a reader, and a crash, see the old file or the new one.

    files.write_atomic(path, data, 0o600)              # replace path
    files.write_atomic(path, data, 0o644, owner=(0, gid))
    files.write_atomic(path, data, 0o600, exclusive=True)   # FileExistsError if path is
    files.fsync_dir(folder)                            # names made durable

write_atomic writes a temporary file beside `path` (created
with O_EXCL and O_NOFOLLOW: never through a link someone left there),
fsyncs it, renames it onto `path` (exclusive: links it there, so an
existing file is never replaced) and fsyncs the folder.  The temporary file
(PATH.PID.RANDOM.tmp) is removed on any failure.  Only os: every program
may import it.
"""
import os


def write_atomic(path, data, mode, owner=None, exclusive=False):
    """`data` (bytes) as the file `path`, mode `mode` less the umask, as open(2)
    makes it; owner=(uid, gid): chowned to them and given exactly `mode` (only
    its creator can read it until then)."""
    tmp = f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"    # two writers, one pid: threads
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600 if owner else mode)
    try:
        try:
            if owner:
                os.fchown(fd, *owner)
                os.fchmod(fd, mode)     # after the chown, which clears set-id bits
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            os.link(tmp, path)
            os.unlink(tmp)
        else:
            os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(os.path.dirname(path) or ".")


def fsync_dir(path):
    """Make the names in a folder durable (renames, links, new files)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
