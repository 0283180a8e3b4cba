"""Round trips of the library's formats, with hypothesis (STYLE.md section 5)."""
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from masq import envelope, spool

ADDRESS = st.text(st.characters(blacklist_characters="\0\r\n", blacklist_categories=("Cs",)),
                  max_size=60)


@given(ADDRESS, st.lists(ADDRESS.filter(bool), min_size=1, max_size=20))
def test_envelope_encode_then_decode_is_identity(sender, recipients):
    env = envelope.Envelope(sender, recipients)
    assert envelope.decode(env.encode()) == env


@given(st.binary(max_size=300))
def test_envelope_decode_of_any_bytes_is_an_envelope_or_an_envelope_error(data):
    try:
        env = envelope.decode(data)
    except envelope.EnvelopeError:
        return
    assert env.recipients and data.endswith(b"\0\0")


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(max_size=200).map(lambda b: b.replace(b"\0", b"")), max_size=8),
       ADDRESS, st.lists(ADDRESS.filter(bool), min_size=1, max_size=5))
def test_spool_keeps_the_bytes_with_lf_line_ends_and_the_envelope(tmp_path, chunks, sender,
                                                                  recipients):
    queue = spool.Spool(str(tmp_path / "spool"))
    queue.create()
    with queue.new_message() as new:
        for chunk in chunks:            # written in pieces: a CRLF may be split between two
            new.write(chunk)
        qid = new.commit(envelope.Envelope(sender, recipients), {"proto": "esmtp"})
    msg = queue.find(qid)
    with msg.open_data() as data:
        assert data.read() == b"".join(chunks).replace(b"\r\n", b"\n")
    assert (msg.sender, msg.recipients, msg.trace["proto"]) == (sender, recipients, "esmtp")
    assert msg.pending() == list(range(len(recipients)))
    msg.record([("done", 0, "ok"), ("deferred", len(recipients) - 1, "later")])
    msg.reload()
    assert msg.state[0][0] == "done" or len(recipients) == 1
    assert msg.state[len(recipients) - 1][0] == "deferred"
    os.unlink(msg.path)


def test_a_commented_out_password_line_logs_in_no_more(tmp_path):
    from masq import passwords
    path = str(tmp_path / "passwd")
    passwords.write_user(path, "alice", b"s3cret")
    assert passwords.verify(path, "alice", b"s3cret")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(b"#" + data)
    assert not passwords.verify(path, "alice", b"s3cret")
    assert not passwords.verify(path, "#alice", b"s3cret")
