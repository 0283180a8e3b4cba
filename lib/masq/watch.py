"""What the masq-send daemon sleeps on besides its FIFO: files and network links.

Files watches named files through inotify(7) on their folders, so that a
file written in place (`echo isp > online`), created, removed, or renamed
over (an editor's save, `mv new online`) all count; Links listens for the
kernel's rtnetlink(7) messages about links and routes.  Each has fileno()
for select() and read(), which takes what is pending without blocking and
says what changed: neither ever wakes the daemon on a timer.

up(name) and default_route() tell whether a link is up now (ioctl
SIOCGIFFLAGS, /proc/net/route and ipv6_route); the events only say when
to look again.
Both classes speak to the kernel directly (ctypes for inotify, a raw
AF_NETLINK socket), as the standard library has neither.
"""
import os
import sys

from masq import Error

# <sys/inotify.h>
IN_MODIFY, IN_CLOSE_WRITE, IN_MOVED_FROM, IN_MOVED_TO = 0x2, 0x8, 0x40, 0x80
IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_MOVE_SELF = 0x100, 0x200, 0x400, 0x800
IN_Q_OVERFLOW, IN_IGNORED, IN_ONLYDIR = 0x4000, 0x8000, 0x01000000
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
FOLDER_EVENTS = (IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_MOVED_FROM
                 | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)
EVENT_HEADER_BYTES = 16         # struct inotify_event: int wd; u32 mask, cookie, len
READ_BYTES = 65536

# <linux/netlink.h>, <linux/rtnetlink.h>
AF_NETLINK, NETLINK_ROUTE = 16, 0
RTMGRP_LINK, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE = 0x1, 0x40, 0x400
# <net/if.h>, <linux/sockios.h>, <linux/route.h>
IFF_UP, IFF_RUNNING = 0x1, 0x40
SIOCGIFFLAGS, IFNAMSIZ, IFREQ_BYTES = 0x8913, 16, 40
RTF_UP, RTF_REJECT = 0x1, 0x200


class WatchError(Error):
    """The kernel refused a watch."""

    code = 111
    temporary = True


class Files:
    """inotify watches on named files: read() -> the set of those that changed."""

    def __init__(self, paths=()):
        import ctypes       # only a daemon with something to watch pays for it
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._get_errno = ctypes.get_errno
        self.fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise WatchError(f"unable to start inotify: {os.strerror(self._get_errno())}")
        self.names = {}         # wd -> {name in the folder: path}
        for path in paths:
            self.add(path)

    def add(self, path):
        """Watch the file at `path` (its folder must exist; the file need not)."""
        folder, name = os.path.split(os.path.abspath(path))
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(folder), FOLDER_EVENTS)
        if wd < 0:
            raise WatchError(f"unable to watch {folder}: {os.strerror(self._get_errno())}")
        self.names.setdefault(wd, {})[name] = path

    def fileno(self):
        return self.fd

    def read(self):
        """The watched paths with an event pending (all of them after an overflow)."""
        changed = set()
        while True:
            try:
                data = os.read(self.fd, READ_BYTES)
            except BlockingIOError:
                return changed
            at = 0
            while at + EVENT_HEADER_BYTES <= len(data):
                wd, mask, _cookie, size = _unpack(data, at)
                name = data[at + EVENT_HEADER_BYTES:at + EVENT_HEADER_BYTES + size]
                at += EVENT_HEADER_BYTES + size
                if mask & (IN_Q_OVERFLOW | IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED):
                    # lost events, or the folder itself went: take everything as changed
                    changed.update(p for names in self.names.values() for p in names.values())
                    continue
                path = self.names.get(wd, {}).get(os.fsdecode(name.rstrip(b"\0")))
                if path:
                    changed.add(path)

    def close(self):
        os.close(self.fd)


def _unpack(data, at):
    """One struct inotify_event header (native byte order)."""
    order = sys.byteorder
    return (int.from_bytes(data[at:at + 4], order, signed=True),
            *(int.from_bytes(data[at + i:at + i + 4], order) for i in (4, 8, 12)))


class Links:
    """rtnetlink: read() is True when a link or a route changed since the last read."""

    def __init__(self):
        import socket       # only detect = "link" listens
        try:
            self.sock = socket.socket(AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK
                                      | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
            self.sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE))
        except OSError as e:
            raise WatchError(f"unable to listen to rtnetlink: {e.strerror}") from None

    def fileno(self):
        return self.sock.fileno()

    def read(self):
        """Take every pending message; what they say is read again from /sys and /proc."""
        changed = False
        while True:
            try:
                if not self.sock.recv(READ_BYTES):
                    return changed
                changed = True
            except BlockingIOError:
                return changed
            except OSError:     # ENOBUFS: messages were lost, so something changed
                changed = True

    def close(self):
        self.sock.close()


def up(name):
    """True when the link is up and running: IFF_UP, and IFF_RUNNING, which the
    kernel sets for operstate "up" or "unknown" (ppp, tun and dummy links never
    say "up").  Asked by ioctl, which answers for the daemon's own network
    namespace; /sys/class/net shows the namespace that mounted /sys."""
    import fcntl
    import socket
    request = name.encode()[:IFNAMSIZ - 1].ljust(IFREQ_BYTES, b"\0")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            answer = fcntl.ioctl(s, SIOCGIFFLAGS, request)
    except OSError:
        return False            # no such link (yet): a ppp0 before the dial
    flags = int.from_bytes(answer[IFNAMSIZ:IFNAMSIZ + 2], sys.byteorder)
    return flags & (IFF_UP | IFF_RUNNING) == IFF_UP | IFF_RUNNING


def default_route():
    """True when a default route (IPv4 or IPv6) goes out through a link that is up."""
    return any(up(link) for link in _default_links())


def _default_links():
    """The links of the default routes in /proc/net/route and /proc/net/ipv6_route."""
    links = []
    try:
        with open("/proc/net/route") as f:
            next(f, None)           # Iface Destination Gateway Flags ... Mask ...
            for line in f:
                cols = line.split()
                if (len(cols) > 7 and cols[1] == "00000000" and cols[7] == "00000000"
                        and int(cols[3], 16) & RTF_UP and not int(cols[3], 16) & RTF_REJECT):
                    links.append(cols[0])
    except OSError:
        pass
    try:
        with open("/proc/net/ipv6_route") as f:
            for line in f:          # dest plen src plen next-hop metric ref use flags iface
                cols = line.split()
                if (len(cols) == 10 and cols[0] == "0" * 32 and cols[1] == "00"
                        and int(cols[8], 16) & RTF_UP and not int(cols[8], 16) & RTF_REJECT):
                    links.append(cols[9])
    except OSError:
        pass
    return links
