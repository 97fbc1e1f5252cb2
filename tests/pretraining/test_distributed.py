"""The processes of a job: the gloo address check of multi-node runs (the DDP runs themselves are in test_cli.py,
through torchrun), and what the helpers do for one process."""
import pytest
import torch

from nnunet_smit.errors import SMITError
from nnunet_smit.pretraining.distributed import (
    DistInfo, StepAgreement, check_gloo_address, gather_objects, mean_over_processes,
)


def test_one_process_needs_no_process_group():
    info = DistInfo()
    assert info.is_main and not info.distributed
    assert gather_objects(info, {"a": 1}) == [{"a": 1}]
    values = torch.tensor([1.0, 3.0])
    assert torch.equal(mean_over_processes(info, values), values)
    agree = StepAgreement(info)
    assert agree(False, True) == (False, True) and agree(True, False) == (True, False)


@pytest.mark.parametrize("environ, resolved, refused", [
    ({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}, "127.0.1.1", True),  # 2 nodes, Debian's /etc/hosts
    ({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}, None, True),  # the name resolves to nothing: gloo uses loopback
    ({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}, "::1", True),
    ({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}, "10.1.2.3", False),
    ({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "GLOO_SOCKET_IFNAME": "ib0"}, "127.0.1.1", False),
    ({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8"}, "127.0.1.1", False),  # one node: loopback reaches every process
    ({"WORLD_SIZE": "16"}, "127.0.1.1", False),  # not torchrun: the nodes are unknown
])
def test_a_multi_node_run_whose_gloo_groups_would_bind_to_loopback_is_refused(monkeypatch, environ, resolved,
                                                                              refused):
    import socket

    def getaddrinfo(host, port, *args, **kwargs):
        if resolved is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        family = socket.AF_INET6 if ":" in resolved else socket.AF_INET
        return [(family, socket.SOCK_STREAM, 6, "", (resolved, 0))]

    monkeypatch.setattr(socket, "gethostname", lambda: "node07")
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    if not refused:
        check_gloo_address(environ)
        return
    with pytest.raises(SMITError) as error:
        check_gloo_address(environ)
    message = str(error.value)
    assert "\n" not in message and "'node07'" in message and "GLOO_SOCKET_IFNAME" in message
    assert (f"loopback address {resolved}" if resolved else "does not resolve") in message


def test_a_signal_asks_for_a_stop_and_a_second_one_reaches_the_handler_before():
    import signal

    from nnunet_smit.pretraining.distributed import StopSignals

    seen = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with StopSignals() as stop:
            assert stop.requested is None
            signal.raise_signal(signal.SIGTERM)
            assert stop.requested == "SIGTERM" and seen == []
            signal.raise_signal(signal.SIGTERM)  # while saving: the handler from before runs
            assert seen == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        signal.raise_signal(signal.SIGTERM)
        assert seen == [signal.SIGTERM] * 2
    finally:
        signal.signal(signal.SIGTERM, before)
