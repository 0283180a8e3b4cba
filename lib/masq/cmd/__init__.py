"""The programs: bin/masq-NAME runs masq.cmd.NAME.main (one job each)."""
