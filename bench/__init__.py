"""Benchmarks of `ibkr-statements fetch` against OpenSSH's `sftp` client, measured in one run.

Run from the repository root: ``.venv/bin/python -m bench`` (``make bench``), or with
``--quick`` for a run of under a minute. Every figure is a whole process, timed from spawn to
exit; the ratios compare the two tools against the same sshd on 127.0.0.1 in the same run.
"""
