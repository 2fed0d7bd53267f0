"""Who may talk to the daemon: decided from the kernel's word about the peer (real sockets)."""
from __future__ import annotations

import grp
import logging
import os
import socket

from flashlexd.ipc.admission import Admission, peer_credentials, peer_groups

STRANGER = 54321  # a uid nobody uses here


def test_root_the_daemons_user_and_allow_uids_are_admitted():
    ours, theirs = socket.socketpair(socket.AF_UNIX)
    with ours, theirs:
        pid, uid, gid = peer_credentials(ours)
        assert (pid, uid) == (os.getpid(), os.geteuid())
        admission = Admission(allow_uids=[1000])
        assert admission.admits(ours, 0, gid) and admission.admits(ours, 1000, gid)
        assert not admission.admits(ours, STRANGER, gid)  # no socket group: uids only


def test_members_of_the_socket_group_are_admitted_by_primary_or_supplementary_group():
    ours, theirs = socket.socketpair(socket.AF_UNIX)
    with ours, theirs:
        _, _, gid = peer_credentials(ours)
        by_primary = Admission(group=grp.getgrgid(gid).gr_name)
        assert by_primary.admits(ours, STRANGER, gid)
        assert not by_primary.admits(ours, STRANGER, gid + 1) or gid + 1 in peer_groups(ours)
        assert peer_groups(ours) == frozenset(os.getgroups())  # what SO_PEERGROUPS reports


def test_a_supplementary_group_admits_a_peer_in_a_child_process(tmp_path):
    """SO_PEERGROUPS read from a real peer that has a supplementary group (set in a child)."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "s"))
    listener.listen(1)
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([4242])
            socket.socket(socket.AF_UNIX).connect(str(tmp_path / "s"))
        finally:
            os._exit(0)
    peer, _ = listener.accept()
    with peer, listener:
        os.waitpid(pid, 0)
        assert 4242 in peer_groups(peer)
        assert Admission(group="4242").admits(peer, STRANGER, -1)
        assert not Admission(group="4243").admits(peer, STRANGER, -1)


def test_a_refused_uid_is_logged_once_a_minute_with_a_count(caplog):
    admission = Admission()
    with caplog.at_level(logging.WARNING, logger="flashlexd.ipc.admission"):
        for second in range(100):
            admission.note_refused(STRANGER, 4242, now=1000.0 + second * 0.5)  # 50 s of attempts
        admission.note_refused(STRANGER, 4242, now=1061.0)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "refused 1 connection from uid 54321" in lines[0]
    assert "refused 100 connections from uid 54321" in lines[1]
