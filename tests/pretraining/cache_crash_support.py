"""A preprocessing function for cache workers that dies, as a worker killed for memory does, on chosen scans."""
import os

from nnunet_smit.pretraining import cache


def die_on_scans_named_killer(source, *args):
    if "killer" in os.path.basename(source.location):
        os._exit(137)
    return cache._process_source(source, *args)


def slow_with_a_stop_flag(source, cases_dir, *args):
    """Each scan takes a second longer; the scan named ``stopper`` first writes ``stop-flag`` next to the cases
    folder (for the test to interrupt the build while it runs) and takes three."""
    import time
    from pathlib import Path

    if "stopper" in os.path.basename(source.location):
        (Path(cases_dir).parent / "stop-flag").touch()
        time.sleep(3.0)
    time.sleep(1.0)
    return cache._process_source(source, cases_dir, *args)


def die_while_writing_scans_named_killer(source, cases_dir, *args):
    """As :func:`die_on_scans_named_killer`, but the worker dies half-way through writing the scan's array (as one
    killed for memory while writing does), leaving the half-written temporary file of ``atomic_write`` behind."""
    from pathlib import Path

    from nnunet_smit.files import atomic_write

    def write_half_and_die(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half written")
        os._exit(137)

    if "killer" in os.path.basename(source.location):
        atomic_write(Path(cases_dir) / f"{source.id}.b2nd", write_half_and_die)
    return cache._process_source(source, cases_dir, *args)
