"""Drop files (masq.drop) and the control socket (masq.control), below the programs.

Hostile drop files are made as root and given away with os.chown, as a user
would leave them in a 3733 drop folder; each is refused without a traceback
and moved aside or left as system-mode.md says.  The black-box tests of the
same paths, with real users in a throwaway root, are in test_system_submit.py.
"""
import io
import os
import select
import stat
import threading
import time

import pytest

from conftest import run
from masq import config, control, drop, envelope, log, spool

NOBODY = 65534
GOOD = b"From: x@test.example\nSubject: hi\n\nbody\n"


def envelope_bytes(sender="nobody@test.example", rcpts=("bob@localhost",)):
    return envelope.Envelope(sender, list(rcpts)).encode()


@pytest.fixture
def system(masq):
    """The masq folder in system mode (user = "root"), with a drop folder as the layout has it."""
    with open(masq.conf) as f:
        text = f.read()
    masq.set_config(text.replace('hostname = ', 'user = "root"\nhostname = ', 1))
    os.mkdir(os.path.join(masq.spool, "drop"))
    os.chmod(os.path.join(masq.spool, "drop"), 0o3733)
    masq.drop = os.path.join(masq.spool, "drop")
    masq.load = lambda: config.load(masq.conf)
    return masq


def plant(masq, content, mode=0o640, owner=NOBODY, name="a" * 32):
    """A drop file as user `owner` would leave it."""
    path = os.path.join(masq.drop, name)
    with open(path, "wb") as f:
        f.write(content)
    os.chown(path, owner, -1)
    os.chmod(path, mode)
    return path


def pick_up(masq):
    conf = masq.load()
    log.setup(conf)         # as masq-send does: event lines go to this folder's masq.log
    return drop.pick_up(conf, spool.Spool(conf.path("spool")))


def corrupt(masq):
    return sorted(os.listdir(os.path.join(masq.spool, "corrupt")))


def test_a_good_drop_file_is_queued_as_its_owner_and_removed(system):
    path = plant(system, drop.MAGIC + envelope_bytes() + GOOD)
    ids = pick_up(system)
    assert len(ids) == 1 and not os.path.exists(path)
    msg = spool.Message(spool.Spool(system.spool), "incoming", ids[0])
    assert msg.trace["user"] == "nobody" and msg.recipients == ["bob@localhost"]
    with msg.open_data() as data:
        text = data.read()
    assert text.startswith(b"Received: by test.example (masq, from user nobody)")
    assert text.endswith(GOOD)


def test_write_makes_a_committed_file_that_pick_up_takes(system):
    conf = system.load()
    name = drop.write(conf, io.BytesIO(GOOD), envelope.Envelope("root@test.example", ["b@x"]))
    st = os.stat(os.path.join(system.drop, name))
    assert len(name) == 32 and stat.S_IMODE(st.st_mode) == 0o640 and st.st_nlink == 1
    with open(os.path.join(system.drop, name), "rb") as f:
        assert f.read() == drop.MAGIC + b"Froot@test.example\0Tb@x\0\0" + GOOD
    assert len(pick_up(system)) == 1 and os.listdir(system.drop) == []


def test_write_refuses_a_message_over_max_size_and_leaves_nothing(system):
    system.set_config(open(system.conf).read().replace("max_size = 52428800", "max_size = 10"))
    with pytest.raises(spool.TooBigError):
        drop.write(system.load(), io.BytesIO(GOOD), envelope.Envelope("a@b", ["c@d"]))
    assert os.listdir(system.drop) == []


def test_write_without_a_drop_folder_is_cant_create(system):
    os.rmdir(system.drop)
    with pytest.raises(drop.DropError) as e:
        drop.write(system.load(), io.BytesIO(GOOD), envelope.Envelope("a@b", ["c@d"]))
    assert e.value.code == 73


def test_write_refuses_a_drop_folder_without_its_setgid_bit(system):
    os.chown(system.drop, -1, NOBODY)
    os.chmod(system.drop, 0o1733)       # files would keep the writer's group: masq could not read
    with pytest.raises(drop.DropError) as e:
        drop.write(system.load(), io.BytesIO(GOOD), envelope.Envelope("a@b", ["c@d"]))
    assert e.value.code == 73 and os.listdir(system.drop) == []


def test_a_file_still_being_written_is_left_alone(system):
    path = plant(system, drop.MAGIC, mode=0o200)
    assert pick_up(system) == [] and os.path.exists(path) and corrupt(system) == []


def test_a_file_never_finished_is_removed_after_a_day(system):
    path = plant(system, drop.MAGIC, mode=0o200)
    old = time.time() - drop.STALE_SECONDS - 60
    os.utime(path, (old, old))
    assert pick_up(system) == [] and not os.path.exists(path)


def test_a_symlink_to_a_secret_is_set_aside_unread(system):
    name = "b" * 32
    os.symlink("/etc/shadow", os.path.join(system.drop, name))
    os.lchown(os.path.join(system.drop, name), NOBODY, -1)
    assert pick_up(system) == []
    assert corrupt(system) == [f"drop-{name}"]
    assert os.path.islink(os.path.join(system.spool, "corrupt", f"drop-{name}"))
    assert system.queue_ids() == []


def test_a_fifo_is_set_aside_without_blocking(system):
    name = "c" * 32
    os.mkfifo(os.path.join(system.drop, name), 0o640)
    assert pick_up(system) == [] and corrupt(system) == [f"drop-{name}"]


def test_a_hard_link_is_set_aside(system):
    path = plant(system, drop.MAGIC + envelope_bytes() + GOOD)
    other = os.path.join(system.dir, "elsewhere")
    os.link(path, other)        # another's file linked in would carry its owner
    assert pick_up(system) == [] and corrupt(system) == ["drop-" + "a" * 32]
    assert system.queue_ids() == []


@pytest.mark.parametrize("content, why", [
    (b"masq-drop 2\n" + envelope_bytes() + GOOD, "no masq-drop 1 line"),
    (drop.MAGIC + b"Fa@b\0Tc@d\0", "the envelope ends early"),
    (drop.MAGIC + b"Xa@b\0Tc@d\0\0" + GOOD, "does not start with a sender"),
    (drop.MAGIC + b"Fa@b\0\0" + GOOD, "no recipients"),
    (drop.MAGIC + envelope_bytes() + b"Subject: a\0b\n\nbody\n", "NUL byte"),
    (drop.MAGIC + envelope_bytes() + b" folded: first\n\nbody\n", "continuation"),
])
def test_a_malformed_file_is_set_aside_with_a_log_line(system, content, why):
    plant(system, content)
    assert pick_up(system) == []
    assert corrupt(system) == ["drop-" + "a" * 32] and system.queue_ids() == []
    assert why in system.log() and "moved to corrupt/drop-" in system.log()


def test_write_refuses_a_nul_byte_as_masq_queue_does(system):
    with pytest.raises(spool.NulError):
        drop.write(system.load(), io.BytesIO(GOOD + b"a\0b\n"), envelope.Envelope("a@b", ["c@d"]))
    assert os.listdir(system.drop) == []


def test_a_nul_byte_in_the_body_is_set_aside_not_retried(system):
    plant(system, drop.MAGIC + envelope_bytes() + GOOD + b"a\0b\n")
    assert pick_up(system) == [] and corrupt(system) == ["drop-" + "a" * 32]


def test_a_file_over_max_size_is_set_aside(system):
    system.set_config(open(system.conf).read().replace("max_size = 52428800", "max_size = 20"))
    plant(system, drop.MAGIC + envelope_bytes() + GOOD + b"x" * 100)
    assert pick_up(system) == [] and corrupt(system) == ["drop-" + "a" * 32]
    assert system.queue_ids() == []


def test_other_names_are_not_drop_files(system):
    plant(system, b"junk", name="notes.txt")
    assert pick_up(system) == [] and os.listdir(system.drop) == ["notes.txt"]


def test_a_queue_run_picks_drop_files_up_only_in_system_mode(system):
    from masq.cmd import send       # run_once itself: main() would drop to the user
    plant(system, drop.MAGIC + envelope_bytes() + GOOD)
    single = open(system.conf).read().replace('user = "root"\n', "")
    system.set_config(single)
    send.run_once(system.load(), spool.Spool(system.spool))
    assert os.listdir(system.drop) == ["a" * 32]
    system.set_config('user = "root"\n' + single)
    send.run_once(system.load(), spool.Spool(system.spool))
    assert os.listdir(system.drop) == []
    # without masq-lspawn (main() starts it) the local delivery waits in the queue
    [msg] = spool.Spool(system.spool).messages()
    assert msg.trace["user"] == "nobody" and msg.recipients == ["bob@localhost"]


def test_the_control_answers_by_the_callers_uid(system):
    conf = system.load()
    system.set_config(open(system.conf).read() + '\n[queue]\nshow_queue = "admin"\n')
    admin_only = system.load()
    server = control.Server.__new__(control.Server)
    server.queue = spool.Spool(system.spool)
    server.conf = conf
    assert server.answer(NOBODY, "list") == ("ok\nMail queue is empty\n", None)
    assert server.answer(NOBODY, "flush") == ("ok\n", ("flush", None))
    assert server.answer(NOBODY, "flush isp")[0].startswith("denied ")
    assert server.answer(0, "flush nosuch")[0].startswith("error no route")
    assert server.answer(NOBODY, "rm -rf /")[0].startswith("error ")
    server.conf = admin_only
    assert server.answer(NOBODY, "list")[0].startswith("denied ")
    assert server.answer(0, "list")[0] == "ok\nMail queue is empty\n"


def test_the_control_socket_serves_one_request_and_a_silent_client_times_out(system,
                                                                             monkeypatch):
    conf = system.load()
    queue = spool.Spool(system.spool)
    server = control.Server(conf, queue)
    try:
        assert stat.S_IMODE(os.stat(queue.folder("control")).st_mode) == 0o666
        got = []
        client = threading.Thread(target=lambda: got.append(control.ask(queue, "flush")))
        client.start()
        select.select([server], [], [], 10)
        assert server.serve() == ("flush", None)
        client.join(10)
        assert got == [("ok", "", "")]
        monkeypatch.setattr(control, "REQUEST_SECONDS", 0.2)
        import socket
        silent = socket.socket(socket.AF_UNIX)
        silent.connect(queue.folder("control"))
        select.select([server], [], [], 10)
        start = time.monotonic()
        assert server.serve() is None
        assert time.monotonic() - start < 2
        silent.close()
    finally:
        server.close()
    with pytest.raises(control.NotRunningError):
        control.ask(queue, "list")


def test_a_stale_control_socket_is_replaced(system):
    queue = spool.Spool(system.spool)
    control.Server(system.load(), queue).sock.close()     # a daemon that died: the file stays
    assert os.path.exists(queue.folder("control"))
    with pytest.raises(control.NotRunningError):
        control.ask(queue, "list")
    server = control.Server(system.load(), queue)
    server.close()


def test_mailq_of_a_user_without_a_daemon_says_so(system):
    # root and masq read the spool; the path of everyone else is pinned in test_system_submit
    r = run(["masq-inject", "-bp"], env=system.env())
    assert r.rc == 0 and b"Mail queue is empty" in r.out, r
