"""What stays in a masq folder's queue: a folder with no route up, the messages
queued for a recipient (test_backscatter, test_qmtp)."""
import os


def offline(masq):
    """No route is up (detect = "file", no online file): remote mail, a bounce to
    elsewhere say, stays in the queue to be seen."""
    with open(masq.conf) as f:
        text = f.read()
    assert 'detect = "always"' in text, text
    masq.set_config(text.replace('detect = "always"', 'detect = "file"', 1)
                    + '\n[route.isp]\nhost = "smtp.isp.example:587"\n')


def queued_for(masq, rcpt):
    """The queue ids (incoming, active or held) of the messages with this recipient."""
    found = []
    for stage in ("incoming", "active", "hold"):
        for qid in masq.queue_ids(stage):
            with open(os.path.join(masq.spool, stage, qid), "rb") as f:
                if b"\nrcpt " + rcpt.encode() + b"\n" in f.read():
                    found.append(qid)
    return found
