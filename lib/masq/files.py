"""Files written whole: a reader, and a crash, see the old file or the new one.

    files.write_atomic(path, data, 0o600)              # replace path
    files.write_atomic(path, data, 0o644, owner=(0, gid))
    files.write_atomic(path, data, 0o600, exclusive=True)   # FileExistsError if path is
    files.fsync_dir(folder)                            # names made durable

write_atomic writes a temporary file beside `path` (created
with O_EXCL and O_NOFOLLOW: never through a link someone left there),
fsyncs it, renames it onto `path` (exclusive: links it there, so an
existing file is never replaced) and fsyncs the folder.  The temporary file
(PATH.PID.RANDOM.tmp) is removed on any failure.  Only posix (and
masq.pathenv): every program may import it, sendmail's path too.
"""
import posix

from masq import pathenv


def write_atomic(path, data, mode, owner=None, exclusive=False):
    """`data` (bytes) as the file `path`, mode `mode` less the umask, as open(2)
    makes it; owner=(uid, gid): chowned to them and given exactly `mode` (only
    its creator can read it until then)."""
    tmp = f"{path}.{posix.getpid()}.{posix.urandom(4).hex()}.tmp"    # two writers, one pid: threads
    flags = posix.O_WRONLY | posix.O_CREAT | posix.O_EXCL | posix.O_NOFOLLOW | posix.O_CLOEXEC
    fd = posix.open(tmp, flags, 0o600 if owner else mode)
    try:
        try:
            if owner:
                posix.fchown(fd, *owner)
                posix.fchmod(fd, mode)     # after the chown, which clears set-id bits
            view = memoryview(data)
            while view:
                view = view[posix.write(fd, view):]
            posix.fsync(fd)
        finally:
            posix.close(fd)
        if exclusive:
            posix.link(tmp, path)
            posix.unlink(tmp)
        else:
            posix.rename(tmp, path)
    except BaseException:
        try:
            posix.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(pathenv.dirname(path) or ".")


def fsync_dir(path):
    """Make the names in a folder durable (renames, links, new files)."""
    fd = posix.open(path, posix.O_RDONLY | posix.O_DIRECTORY | posix.O_CLOEXEC)
    try:
        posix.fsync(fd)
    finally:
        posix.close(fd)
